"""Rules for the names and numbers carried by messages that arrive on plain subscriptions.

A command that breaks a rule is refused to its sender.  Heartbeats, reports and events
have no one to answer, and what they carry flows on into registry records, KV keys,
subjects and health rollups: one heartbeat with a 5,000-character node name once pushed a
KV key past nats-server's 4 KiB control line and disconnected the Deployer for good, and
one claiming ``interval_s = 1e9`` made a node that never turned lost.  So each inbound
message type has a ``validate(subject)`` built from these rules, and
``Node.subscribe_decoded`` drops (and counts) whatever fails it.

Every rule raises ``InvalidMessage`` saying what was wrong and what was expected.
"""

from __future__ import annotations

import math
import re

from protocol import subjects
from protocol.errors import BadName, InvalidMessage

# A counter no real node reaches: an API node answers ~30,000 requests/s on this
# hardware, so 10**13 is ten years of it; 10**15 requests is a forgery or a bug.
MAX_COUNT = 10**13
MAX_TEXT = 4096  # free text (reasons, messages) carried into events and logs
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def name(value: object, what: str) -> None:
    """A name that reaches subjects or KV keys: ``protocol.subjects.token``'s rule."""
    try:
        subjects.token(value, what)  # type: ignore[arg-type]
    except BadName as exc:
        raise InvalidMessage(str(exc)) from None


def label(value: object, what: str, *, empty: bool = False) -> None:
    """A short identifier such as a software version or an instance id: 1-64 letters,
    digits, '.', '_', '+' or '-' (or empty, when ``empty``)."""
    if empty and value == "":
        return
    if not isinstance(value, str) or not _LABEL.match(value):
        raise InvalidMessage(f"invalid {what} {_shown(value)}: expected 1-64 letters, "
                             "digits, '.', '_', '+' or '-'")


def text(value: object, what: str, *, limit: int = MAX_TEXT) -> None:
    """Free text: at most ``limit`` characters."""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidMessage(f"{what} is {len(value) if isinstance(value, str) else '?'} "
                             f"characters: expected at most {limit}")


def count(value: object, what: str, *, limit: int = MAX_COUNT) -> None:
    """A counter: an integer from 0 to ``limit``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidMessage(f"{what} {_shown(value)} out of bounds: expected an integer "
                             f"from 0 to {limit}")


def number(value: object, what: str, low: float, high: float) -> None:
    """A finite number from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        raise InvalidMessage(f"{what} {_shown(value)} out of bounds: expected a finite "
                             f"number from {low:g} to {high:g}")


def finite(value: object, what: str) -> None:
    """Any finite number (timestamps: a clock may be off, but never infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise InvalidMessage(f"{what} {_shown(value)} is not a finite number")


def same_subject(subject: str, expected: str, what: str) -> None:
    """The sender a message names must be the one its subject names."""
    if subject != expected:
        raise InvalidMessage(f"{what} arrived on {_shown(subject)} but names the sender of "
                             f"{_shown(expected)}: expected the two to match")
