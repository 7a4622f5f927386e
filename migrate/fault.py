"""Fault injection at a protocol step: a LAB AND TEST option, never for production.

``--fault ACTION@N`` on ``minivmm serve`` and ``minivmm run --migrate-to``
makes this VMM fail at step N of each migration session.  A step is one
record this side sends or receives, counted from 1 over the session,
handshake included (``migrate/steps.py``); the hook runs before a record is
written and after one was received (and, sealed, authenticated).  Actions:

``crash``  the process dies at once, as by SIGKILL (it sends itself SIGKILL):
           no ABORT, no clean-up, nothing written; the peer sees the
           connection reset.  A host losing power at that step.
``hang``   the engine blocks at that step for ever (a VMM stuck in the
           kernel).  It holds no :class:`~migrate.steps.Timebase`, so the
           peer's record timeouts and phase deadlines fire; only a kill ends
           the blocked engine (other threads, the guest's, go on).
``stall``  the engine blocks at that step until the peer has given up and
           closed the connection (a VMM stopped for longer than any deadline,
           then continued), then carries on: its own failure handling runs
           on what it finds.  Never blocks for ever: every wait of the peer
           has a deadline.
``close``  the connection is closed at that step: a record about to be sent
           is not sent, a record just received is kept and acted on, and
           nothing more crosses.

``--trace-steps`` prints every step to stderr (a walk over all steps counts
them first with it).  Both are printed loudly at start and when they act.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import threading
from dataclasses import dataclass

from migrate.steps import Step, attach

ACTIONS = ("crash", "hang", "stall", "close")


@dataclass(frozen=True)
class Fault:
    action: str
    step: int

    def __str__(self) -> str:
        return f"{self.action}@{self.step}"


def parse(text: str) -> Fault:
    """``ACTION@N`` (N >= 1) to a :class:`Fault`."""
    m = re.fullmatch(r"\s*([a-z]+)\s*@\s*(\d+)\s*", text)
    if not m or m.group(1) not in ACTIONS or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"--fault takes ACTION@N with ACTION one of {', '.join(ACTIONS)} "
                                         f"and N >= 1 (a protocol step), not {text!r}")
    return Fault(m.group(1), int(m.group(2)))


def add_options(g) -> None:
    g.add_argument("--fault", type=parse, metavar="ACTION@N",
                   help="FAULT INJECTION, for labs and tests only: at step N of each migration session "
                        "(the N-th record this VMM sends or receives, from 1) crash (SIGKILL itself), "
                        "hang (block for ever), stall (block until the peer gives up, then go on) or "
                        "close (close the connection). See docs/migration.md, 'Fault injection'")
    g.add_argument("--trace-steps", action="store_true",
                   help="print every protocol step (record sent or received) to stderr")


def announce(args) -> str | None:
    fault = getattr(args, "fault", None)
    if fault is None:
        return None
    return (f"FAULT INJECTION ON (lab/test option): {fault.action} at step {fault.step} of every "
            f"migration session -- not for production")


class Injector:
    """The step hook of one channel: traces, and acts at the chosen step."""

    def __init__(self, channel, fault: Fault | None, trace: bool, say):
        self.channel = channel
        self.fault = fault
        self.trace = trace
        self.say = say

    def __call__(self, step: Step) -> None:
        if self.trace:
            self.say(f"step {step.n}: {step.direction} {step.rtype} {step.length} bytes, seq {step.seq}")
        if self.fault is None or step.n != self.fault.step:
            return
        self.say(f"FAULT INJECTED: {self.fault.action} at step {step.n} ({step.direction} {step.rtype}, "
                 f"seq {step.seq})")
        getattr(self, "_" + self.fault.action)()

    def _crash(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()        # (SIGKILL is delivered before this returns)

    def _hang(self) -> None:
        threading.Event().wait()

    def _stall(self) -> None:
        """Until the peer closed its end (or ours was closed under us): watched with
        POLLRDHUP, which does not consume what the peer sent before (its ABORT)."""
        events = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        while True:
            try:
                fd = self.channel.sock.fileno()
            except OSError:
                return
            if fd < 0:
                return
            p = select.poll()
            p.register(fd, events)
            if p.poll(500):
                return

    def _close(self) -> None:
        self.channel.close()


def wrap(factory, args, who: str):
    """``factory(sock, timeout=...)`` with the fault hook (and the step trace) of
    ``args`` on every channel it makes; ``factory`` itself without them."""
    fault, trace = getattr(args, "fault", None), getattr(args, "trace_steps", False)
    if fault is None and not trace:
        return factory

    def say(text: str) -> None:
        print(f"minivmm {who}: {text}", file=sys.stderr, flush=True)

    def make(sock, timeout):
        ch = factory(sock, timeout=timeout)
        return attach(ch, Injector(ch, fault, trace, say))
    return make
