"""The "offline-mail" worker: end-to-end receipts (batched) and resends, off the receiver thread."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from secureim.client.ports import CourierHost, CourierMailbox
from secureim.e2e import sessions as e2e
from secureim.errors import MessageRefused, SecureIMError

if TYPE_CHECKING:
    from secureim.client.outgoing import Outgoing

log = logging.getLogger("secureim.offline")


class Courier:
    def __init__(self, host: CourierHost, mailbox: CourierMailbox, *, max_jobs: int) -> None:
        self._host = host
        self._mailbox = mailbox
        self._jobs: queue.Queue = queue.Queue(maxsize=max_jobs)
        self._thread: threading.Thread | None = None

    def receipt(self, peer: str, msg_id: bytes) -> None:
        self._job(("receipt", peer, msg_id))

    def resend(self, entry: Outgoing) -> None:
        """Seal again under a new offline key, on the worker (the receiver must not wait for it)."""
        self._job(("resend", entry))

    def _job(self, job) -> None:
        with self._mailbox.lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="offline-mail", daemon=True)
                self._thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            log.warning("receipt queue full; a receipt was dropped")

    def _run(self) -> None:
        while not self._host.stopping.is_set():
            try:
                first = self._jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < e2e.MAX_RECEIPT_IDS:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            receipts: dict[str, list[bytes]] = {}
            for job in batch:
                if job[0] == "receipt":
                    receipts.setdefault(job[1], []).append(job[2])
                else:
                    self._resend(job[1])
            for peer, ids in receipts.items():
                self._send_receipt(peer, ids)

    def _send_receipt(self, peer: str, ids: list[bytes]) -> None:
        content = e2e.receipt_content(ids[: e2e.MAX_RECEIPT_IDS])
        try:
            if self._host.send_live_body(peer, e2e.BODY_RECEIPT, content):
                return
            try:
                self._mailbox.send_body(peer, e2e.BODY_RECEIPT, content)
            except MessageRefused:
                if self._host.send_live_body(peer, e2e.BODY_RECEIPT, content):  # it came up meanwhile
                    return
                raise
        except (SecureIMError, ValueError) as exc:
            log.info("a receipt to a peer was not sent: %s", exc)

    def resend_live(self, entry: Outgoing) -> None:
        try:
            self._host.send_sealed(entry.peer, entry.text, None, resend=entry)
        except SecureIMError as exc:  # lost again: the next reconnect marks it again
            log.info("a message was not resent: %s", exc)

    def _resend(self, entry: Outgoing) -> None:
        """The offline key of that generation had expired: seal again under a new one, once."""
        try:
            again = self._mailbox.send_text(entry.peer, entry.text, entry.msg_id, retried=entry.stored)
        except (SecureIMError, ValueError) as exc:
            self._mailbox.refuse(entry, str(exc))
            return
        log.debug("stored message resealed (%s)", again.state)
