"""Text from other people, made safe to show on a terminal."""

from __future__ import annotations

import logging
import unicodedata

from secureim.client import offline as offline
from secureim.e2e import sessions as e2e

log = logging.getLogger("secureim.client")


# =============================================================================
# Display hygiene
# =============================================================================
# Format characters (category Cf) that only join or shape what is around them: the zero-width
# non-joiner and joiner (emoji families, professions; Indic and Persian scripts), the soft
# hyphen, the word joiner and the tag characters of subdivision flags.  Variation selectors
# are category Mn and are kept anyway.  Every other Cf is escaped: the bidi overrides and
# isolates (U+202A-202E, U+2066-2069) and marks (U+200E, U+200F, U+061C) can reorder what
# is shown (CVE-2021-42574, "Trojan Source"), the zero-width space hides text in names.
HARMLESS_FORMAT_CHARS = frozenset({0x00AD, 0x200C, 0x200D, 0x2060}) | frozenset(range(0xE0020, 0xE0080))
MAX_DISPLAY_CHARS = e2e.MAX_TEXT_BYTES  # a message is at most 16 KiB, so never more characters


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def sanitize(text: str, max_chars: int = 4096) -> str:
    """Neutralise control characters and terminal escapes before anything is shown.

    Every C0/C1 control (ESC and newline included), DEL, bidi control, line/paragraph
    separator, surrogate, private-use or unassigned code point, and every format
    character not in :data:`HARMLESS_FORMAT_CHARS`, becomes a visible ``\\x..`` or
    ``\\u....`` escape, so nobody can move the cursor, reorder or rewrite another
    user's screen.  Emoji sequences (ZWJ, variation selectors) are kept.
    """
    out = []
    for ch in text[:max_chars]:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp", "Co", "Cs", "Cn") or (
            cat == "Cf" and ord(ch) not in HARMLESS_FORMAT_CHARS
        ):
            out.append(_escape(ch))
        else:
            out.append(ch)
    if len(text) > max_chars:
        out.append("…")
    return "".join(out)


def sanitize_lines(text: str, max_chars: int = MAX_DISPLAY_CHARS) -> list[str]:
    """A message as the lines to show: split on newlines (CRLF counts as one), each sanitised.

    The caller prefixes *every* line with the sender, so a line inside a message can
    never pass for a line from someone else.
    """
    return [sanitize(line, max_chars) for line in text[:max_chars].replace("\r\n", "\n").split("\n")]
