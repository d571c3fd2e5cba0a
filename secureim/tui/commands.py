"""The terminal's slash commands and their help text."""

from __future__ import annotations

from secureim.client import MAX_PASSWORD_BYTES, TICKET_LIFETIME_S
from secureim.client import MAX_QUEUED_LINES as MAX_QUEUED_LINES
from secureim.client import scripting as S

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_KEY_MISMATCH, EXIT_LOGIN_FAILED = (
    S.EXIT_OK,
    S.EXIT_ERROR,
    S.EXIT_USAGE,
    S.EXIT_KEY_MISMATCH,
    S.EXIT_LOGIN_FAILED,
)
HISTORY_DEFAULT_LINES = 20
MAX_LOGIN_ROUNDS = 6
DELETE_ANSWER_TIMEOUT_S = 30.0  # bcrypt on a busy server; the answer normally takes well under a second
MAX_PASSWORD_TRIES = 3
MIN_PASSWORD_BYTES = 8  # the server's rule (auth.MIN_PASSWORD_BYTES); it checks again
PASSWORD_RULE = f"Passwords are {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} characters."
# A lost connection (docs/CLIENT.md, "When the connection drops"): the library resumes with the session
# ticket on the next server of --host, waiting before try k a random time up to
# min(C.RECONNECT_MAX_DELAY_S, C.RECONNECT_BASE_DELAY_S * 2^(k-1)) (full jitter), for as long as the
# ticket can still be valid: no ticket outlives TICKET_LIFETIME_S, and a refused one asks to log in again.
TERMINAL_RECONNECT_WINDOW_S = float(TICKET_LIFETIME_S)
TERMINAL_RECONNECT_ATTEMPTS = 20_000  # not the bound that ends it: at 4 s a try on average, the window is
# MAX_QUEUED_LINES (lines typed while disconnected): the library's policy, secureim.client.waiting.
LOGIN_WATCH_POLL_S = 0.25  # how soon the login watcher lets go of the socket for a login

# name -> (usage, one-line summary, more help or "").  /help COMMAND shows one entry.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "/to": (
        "/to USER",
        "talk to USER, or in #ROOM (several conversations can be open at once)",
        "Messages you type go to USER (or to every member of #ROOM) from now on; the prompt shows where.",
    ),
    "/rooms": ("/rooms", "list the rooms you are in", ""),
    "/create": (
        "/create #ROOM",
        "make a room (you are its admin); then /invite people",
        "Room names are '#' and 1 to 32 of a-z, 0-9, '_' and '-'. Messages in a room are encrypted "
        "end to end with each member's own sender key; the server relays what it cannot read.",
    ),
    "/invite": (
        "/invite #ROOM USER",
        "add USER to #ROOM (its admin only)",
        "Every member's client checks your signature on the change and shows it. USER cannot read "
        "what was said in #ROOM before.",
    ),
    "/remove": (
        "/remove #ROOM USER",
        "remove USER from #ROOM (its admin only)",
        "USER's client cannot read anything said in #ROOM afterwards: every member makes a new key.",
    ),
    "/leave": ("/leave #ROOM", "leave #ROOM (its admin's /leave closes it for everyone)", ""),
    "/members": ("/members #ROOM", "list the members of #ROOM, as your client verified them", ""),
    "/who": ("/who", "list who is online", ""),
    "/pending": (
        "/pending",
        "list your messages of this session that are not delivered yet",
        "A message to someone offline is stored (encrypted end to end) by the server until they log "
        'in; "delivered" comes from their client, which the server cannot fake.',
    ),
    "/unread": (
        "/unread",
        "show which conversations have messages you have not seen",
        "Messages from a conversation other than the current one are marked with * and ring "
        "the terminal bell (--no-bell to silence); /to USER marks them read.",
    ),
    "/direct": (
        "/direct USER",
        "talk to USER peer to peer over UDP (the server no longer carries the messages)",
        "Direct mode shows your IP address and a UDP port to USER (and USER's to you); the "
        "messages stay encrypted end to end. Also accepts USER's request for a direct link.",
    ),
    "/mode": ("/mode USER", "show whether the conversation with USER is direct or relayed", ""),
    "/fingerprint": ("/fingerprint", "show the server's and your own identity fingerprints", ""),
    "/verify": ("/verify USER", "show the safety number to compare with USER (in person or by phone)", ""),
    "/verified": ("/verified USER", "mark USER as verified, after the safety numbers matched", ""),
    "/accept": (
        "/accept USER",
        "accept USER's changed identity key (after checking /verify USER)",
        "Works at any time after the warning, also after this client was restarted.",
    ),
    "/history": (
        "/history [N]",
        f"show the last N lines (default {HISTORY_DEFAULT_LINES}) of this conversation",
        "The history is kept under --home, encrypted under a key only your password opens; "
        "--no-history keeps nothing.",
    ),
    "/forget": ("/forget USER", "erase the local history of the conversation with USER", ""),
    "/passwd": (
        "/passwd",
        "change your password (the old one is asked first)",
        "Every saved login (resumption ticket) of your account ends; this session goes on.",
    ),
    "/delete-account": (
        "/delete-account",
        "delete your account on the server (asks your password and a typed confirmation)",
        "Your account, your conversations and your saved logins on the server end; "
        "the files under --home stay.",
    ),
    "/help": ("/help [COMMAND]", "this help, or help for one command", ""),
    "/quit": ("/quit", "leave (Ctrl-D on an empty line leaves too)", ""),
}
USER_COMMANDS = frozenset(name for name, (usage, _s, _m) in COMMANDS.items() if "USER" in usage)
ROOM_COMMANDS = frozenset(name for name, (usage, _s, _m) in COMMANDS.items() if "#ROOM" in usage)


def help_text() -> str:
    lines = ["[CLIENT]: Commands (case does not matter; Tab completes commands and names):"]
    width = max(len(usage) for usage, _s, _m in COMMANDS.values()) + 2
    lines += [f"  {usage:<{width}}{summary}" for usage, summary, _more in COMMANDS.values()]
    lines += [
        f"  {'//text':<{width}}send a line that starts with /",
        "Anything else is sent to the current destination. Ctrl-C clears the line.",
        "Direct mode shows your address to the peer: see /help direct.",
    ]
    return "\n".join(lines)


HELP = help_text()
