"""The timer: the only source of preemption (vector 0x20, like IRQ0).

Deterministic mode counts virtual time in guest instructions: a slice that
runs to its instruction budget advances the clock by exactly that budget; a
slice that ends early (a trap, an I/O stop, hlt) advances it by a fixed
``exit_cost``, because Unicorn does not report how many instructions ran
before the stop.  The same guest therefore always sees its ticks at the same
points.  Fast mode ticks on host time instead and is not reproducible.
Ticks that fall due while the guest has interrupts off are coalesced into one
pending tick, as a PIT's single latch would.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimerState:
    VERSION = 1
    period: int
    exit_cost: int
    vclock: int
    next_tick: int
    pending: bool
    delivered: int


class Timer:
    def __init__(self, period: int = 100_000, exit_cost: int = 64):
        if period < 1000 or exit_cost < 1:
            raise ValueError("timer period must be >= 1000 instructions and exit_cost >= 1")
        self.period = period
        self.exit_cost = exit_cost
        self.vclock = 0
        self.next_tick = period
        self.pending = False
        self.delivered = 0

    def budget(self) -> int:
        """Instructions the next slice may run before the next tick is due."""
        return max(1, self.next_tick - self.vclock)

    def advance(self, instructions: int) -> None:
        self.vclock += instructions
        if self.vclock >= self.next_tick:
            self.pending = True
            # Coalesce: the next tick is one period after now, not a backlog.
            self.next_tick = self.vclock + self.period

    def skip_to_next_tick(self) -> None:
        """Idle (hlt with IF=1): nothing runs until the tick, so jump to it."""
        self.advance(self.budget())

    def fire_now(self) -> None:
        """Fast mode: host time says a tick is due."""
        self.pending = True

    def acknowledge(self) -> None:
        self.pending = False
        self.delivered += 1

    def save(self) -> TimerState:
        return TimerState(self.period, self.exit_cost, self.vclock, self.next_tick,
                          self.pending, self.delivered)

    @classmethod
    def restore(cls, st: TimerState) -> "Timer":
        t = cls(st.period, st.exit_cost)
        t.vclock, t.next_tick, t.pending, t.delivered = st.vclock, st.next_tick, st.pending, st.delivered
        return t
