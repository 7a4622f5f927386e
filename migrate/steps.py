"""Protocol steps: one hook at every record a side sends or receives.

A *step* is one record crossing this side's channel: the n-th record sent or
received, counted from 1 over the whole session (handshake included).  Two
users stand on this seam, neither of them in the engine:

- stepping (the TUI): a hook that blocks until the student presses a key
  holds the engine between two messages.  It holds the channel's
  :class:`Timebase` while it blocks, so no record timeout or phase deadline
  fires because a student is reading (the deadlines are measured on that
  clock, not on the wall clock);
- fault injection (the attack lab, the kill-at-every-step tests): a hook that
  crashes, hangs or closes the connection at step N.

The hook runs on the engine's thread, before a record is written and after a
record was received and (in the secure channel) authenticated, so a rejected
record is never a step.  It may raise: the engine then fails as it would on
a broken connection.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

SEND = "send"
RECV = "recv"


HEAD_BYTES = 2048        # how much of a record's body a step carries (a PAGES body is 1 MiB)


@dataclass(frozen=True)
class Step:
    n: int              # 1-based: the n-th record this side sent or received
    direction: str      # SEND or RECV
    rtype: str          # the record type's name (HELLO, PAGES, COMMIT, ...)
    length: int         # body length in bytes, as on the wire (sealed: with its tag)
    seq: int            # the record's sequence number in its direction
    # The first HEAD_BYTES of the body as this side knows it: sent, before it
    # was sealed; received, once authenticated (a PAGES record's count and
    # frame numbers, a KEY_SHARE, ...), for a hook that shows what a record
    # says (the TUI).  A copy: a hook cannot change what crosses.
    head: bytes = b""


StepHook = Callable[[Step], None]


class Timebase:
    """A monotonic clock that stands still while it is held.

    ``now()`` is ``time.monotonic()`` minus the time spent held, so a deadline
    computed as ``now() + timeout`` moves out by exactly the held time.  One
    Timebase may be shared by both engines of one process (the TUI holds the
    source and the destination together): while either holder holds it, both
    sides' deadlines stand still.  Holds nest (a count), so two holders never
    release each other's hold.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic):
        self._mono = monotonic
        self._lock = threading.Lock()
        self._holds = 0
        self._held_since = 0.0
        self._held_total = 0.0

    def now(self) -> float:
        with self._lock:
            t = self._mono()
            held = self._held_total + (t - self._held_since if self._holds else 0.0)
            return t - held

    @property
    def held(self) -> bool:
        return self._holds > 0

    @property
    def held_seconds(self) -> float:
        """Total time held so far (finished holds and the current one)."""
        with self._lock:
            return self._held_total + (self._mono() - self._held_since if self._holds else 0.0)

    def hold(self) -> None:
        with self._lock:
            if self._holds == 0:
                self._held_since = self._mono()
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            if self._holds == 0:
                raise RuntimeError("Timebase.release() without hold()")
            self._holds -= 1
            if self._holds == 0:
                self._held_total += self._mono() - self._held_since

    def __enter__(self) -> "Timebase":
        self.hold()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def real_deadline(channel, deadline: float | None) -> float | None:
    """A deadline on ``channel``'s clock as a ``time.monotonic()`` value, for
    code that checks it against the wall clock (the state-document parser).
    Exact as long as no hold happens meanwhile, which is true between two steps."""
    if deadline is None:
        return None
    return deadline + (time.monotonic() - channel.now())


def attach(channel, hook: StepHook | None = None, timebase: Timebase | None = None):
    """Put ``hook`` and ``timebase`` on a channel (any :class:`migrate.wire.Channel`);
    returns the channel, so a channel factory can be wrapped in one line::

        factory = lambda sock, timeout: attach(mode.channel(sock, timeout=timeout, role=role), hook)
    """
    if hook is not None:
        channel.on_step = hook
    if timebase is not None:
        channel.now = timebase.now
    return channel
