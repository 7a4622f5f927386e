"""The pre-copy round policy (Clark et al., NSDI 2005): when to stop copying
while the guest runs, and pause it for the final copy.

Round 0 sends every page; round r > 0 re-sends the pages the guest dirtied
during round r-1.  After each round the source asks :meth:`PrecopyPolicy.decide`
with the size of the new dirty set.  It stops (stop-and-copy) at the first
rule that holds, in this order:

1. ``remaining == 0``: nothing left to send.
2. **fits the downtime target**: ``remaining * cost_per_page <= downtime_target``,
   where ``cost_per_page`` is measured in the last round that sent page data
   (copy + hash + send, seconds per page, with the guest running beside it,
   so it errs on the slow side).  This is the rule that normally ends
   pre-copy.
3. ``max_rounds``: this many rounds were run (a guest that dirties pages
   faster than the link sends them never converges; QEMU and Xen bound it too).
4. ``max_bytes_ratio``: the bytes sent so far plus the remaining set would
   exceed this multiple of guest RAM.

``round_ticks`` is no stop rule: with it (N > 0) pre-copy runs in
lockstep.  The guest waits while the source connects and attests and while
each round is sent, and runs exactly N of its timer ticks between one round
and the next (or the pause).  Default 0: the guest runs freely beside the
copy, as a live migration should.  In lockstep what a round copies and
dirties is the guest's doing alone, not the host's speed, and the guest's
progress during a migration is N ticks a round: the migration lab sets it so
that the page its attacks aim at has changed since its last copy in every
round (a page the guest writes while it is being copied goes as zeros and
again next round: in lockstep that never happens), and the guest never
finishes during pre-copy, on an idle laptop and on a loaded CI machine alike.
It also makes pre-copy easy to follow step by step (the TUI's attacks).

Rules 3 and 4 stop with the target *not met* (``Decision.target_met`` is
False): the report says so, with the estimate and how far over it is.

The downtime target covers the pages only; the final state document, the
destination's rebuild of the machine and two round trips come on top (the
report shows the real downtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from migrate.wire import PAGE_SIZE

DEFAULT_COST_PER_PAGE = 10e-6       # before any round has measured one


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    estimate: float                 # seconds to send the remaining set
    target_met: bool = True         # False: stopped at a bound with more left than the target allows


@dataclass(frozen=True)
class PrecopyPolicy:
    downtime_target: float = 0.030  # seconds
    max_rounds: int = 30
    max_bytes_ratio: float = 3.0
    round_ticks: int = 0            # > 0: lockstep pre-copy, the guest runs N ticks between rounds

    def __post_init__(self):
        if not self.downtime_target > 0:
            raise ValueError("downtime target must be > 0 seconds")
        if self.max_rounds < 1:
            raise ValueError("max rounds must be >= 1")
        if not self.max_bytes_ratio > 0:
            raise ValueError("max bytes ratio must be > 0")
        if self.round_ticks < 0:
            raise ValueError("round ticks must be >= 0")

    def decide(self, *, rounds_done: int, remaining: int, cost_per_page: float | None,
               bytes_sent: int, ram_size: int) -> Decision:
        cost = cost_per_page if cost_per_page else DEFAULT_COST_PER_PAGE
        estimate = remaining * cost
        if remaining == 0:
            return Decision(True, "no dirty pages left", 0.0)
        if estimate <= self.downtime_target:
            return Decision(True, f"dirty set of {remaining} pages fits the downtime target "
                                  f"(estimated {estimate * 1e3:.1f} ms <= {self.downtime_target * 1e3:g} ms)",
                            estimate)
        if rounds_done >= self.max_rounds:
            return Decision(True, f"round bound reached ({self.max_rounds} rounds); "
                                  f"{remaining} pages left", estimate, target_met=False)
        limit = self.max_bytes_ratio * ram_size
        if bytes_sent + remaining * PAGE_SIZE > limit:
            return Decision(True, f"byte bound reached ({bytes_sent / ram_size:.2f} x RAM sent, "
                                  f"limit {self.max_bytes_ratio:g} x RAM); {remaining} pages left", estimate,
                            target_met=False)
        return Decision(False, f"{remaining} pages dirty, estimated {estimate * 1e3:.1f} ms", estimate)

    def to_dict(self) -> dict:
        return {"downtime_target": self.downtime_target, "max_rounds": self.max_rounds,
                "max_bytes_ratio": self.max_bytes_ratio, "round_ticks": self.round_ticks}
