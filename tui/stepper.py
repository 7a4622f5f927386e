"""Holding both engines between two protocol steps while a student reads.

Every step (a record sent or received by either engine: the hook of
``migrate.steps``) passes through :meth:`Stepper.at_step` on its engine's
thread.  Steps are taken one at a time (a lock), so the frames the UI gets
are in one order; when the current command says "stop here", the step's
thread waits for the next command with the shared :class:`Timebase` held
(no record timeout or phase deadline runs while it waits) and with the
:class:`SliceGate` closed (the source's guest thread stops between two
slices, so the source machine does not run on beside a held protocol).

Commands say where to stop next: at the next step, when the phase (or the
pre-copy round) changes, or never (run to the end).  ``close()`` makes every
waiting and every later step raise :class:`migrate.errors.ConnectionLost`,
so both engines end as they would on a broken connection (quitting the TUI).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from migrate.errors import ConnectionLost

# Commands
MESSAGE, PHASE, ROUND, RUN, PAUSE = "message", "phase", "round", "run", "pause"


@dataclass(frozen=True)
class Position:
    """Where a step is: what the stop rules compare."""
    n: int
    phase: str
    round: int | None


class SliceGate:
    """The source engine's ``slice_gate``: entered around each guest slice.
    While anyone holds it, the guest thread waits before its next slice;
    ``hold()`` returns once no slice is running."""

    def __init__(self):
        self._cond = threading.Condition()
        self._holders = 0
        self._in_slice = False

    def __enter__(self):
        with self._cond:
            while self._holders:
                self._cond.wait()
            self._in_slice = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._in_slice = False
            self._cond.notify_all()

    def hold(self) -> None:
        # Never called from inside a slice (hooks run in channel sends and
        # receives, between slices), so waiting for the slice to end is safe.
        with self._cond:
            self._holders += 1
            while self._in_slice:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._holders -= 1
            self._cond.notify_all()

    @property
    def held(self) -> bool:
        return self._holders > 0


class Stepper:
    def __init__(self, timebase, gate: SliceGate, *, paused: bool = True):
        self.timebase = timebase
        self.gate = gate
        self._turn = threading.Lock()
        self._cond = threading.Condition()
        self._command = PAUSE if paused else RUN
        self._since: Position | None = None      # where the command was given
        self._generation = 0
        self.waiting: Position | None = None      # the step held now, if any
        self.last: Position | None = None         # the latest step
        self.closed = False

    # ------------------------------------------------------------ UI thread
    def command(self, kind: str) -> None:
        with self._cond:
            self._command = kind
            self._since = self.waiting or self.last
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -------------------------------------------------------- engine threads
    def _stops_at(self, pos: Position) -> bool:
        kind, since = self._command, self._since
        if kind == RUN:
            return False
        if kind in (PAUSE, MESSAGE) or since is None:
            return True
        if kind == PHASE:
            return pos.phase != since.phase
        return (pos.phase, pos.round) != (since.phase, since.round)     # ROUND

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionLost("the TUI closed the session")

    def at_step(self, position, frame) -> None:
        """The hook body.  ``position()`` -> Position (cheap); ``frame(pos,
        stopping)`` publishes the frame for this step (capturing the hosts
        when ``stopping``)."""
        self._check_open()
        self.gate.hold()
        try:
            with self._turn:
                self._check_open()
                pos = self.last = position()
                with self._cond:
                    stop = self._stops_at(pos)
                    # Taken before the frame goes out: a key pressed as soon as the
                    # frame shows releases this step (taken after, it was lost and
                    # the engine waited for a second key).
                    gen = self._generation
                # Capturing the hosts is the TUI's time, not the engine's: the
                # shared clock stands still meanwhile (no deadline, no round timing).
                with self.timebase:
                    frame(pos, stop)
                if not stop:
                    return
                with self._cond:
                    # (set after the frame: whoever sees ``waiting`` finds its frame
                    # published; the app re-renders when it changes, app._tick)
                    self.waiting = pos
                    self.timebase.hold()
                    try:
                        while self._generation == gen and not self.closed:
                            self._cond.wait()
                    finally:
                        self.timebase.release()
                        self.waiting = None
                self._check_open()
        finally:
            self.gate.release()
