"""The built-in guest images: what ``minivmm guests`` lists and ``minivmm run NAME`` boots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from guests.build import Program, build_image
from minivmm.image import GuestImage


@dataclass(frozen=True)
class Guest:
    name: str
    description: str
    programs: Callable[[], list[Program]]
    kernel: str = "honest"

    def build(self, ram_size: int = 16 << 20) -> GuestImage:
        return build_image(self.programs(), name=self.name, ram_size=ram_size,
                           description=self.description, kernel=self.kernel)


def _lab(kernel: str, what: str) -> "Guest":
    """An attack-lab guest: a hostile kernel, the protected secret keeper, and
    a counter that shows everyone else keeps running."""
    return Guest(f"attack-{kernel}", f"attack lab: a kernel that {what} the protected secret keeper",
                 lambda: [P("keeper", data_pages=3, args=(5, 1)), P("counter", args=(8, 100_000))],
                 kernel=kernel)


P = Program.builtin
GUESTS = {g.name: g for g in [
    Guest("demo", "the default demo: a protected counter, a memory checker, a page dirtier and hello",
          lambda: [P("counter", data_pages=1, args=(40, 150_000, 1)), P("memcheck", args=(40,)),
                   P("dirtier", data_pages=32, args=(32, 96, 1)), P("hello")]),
    Guest("hello", "one process that prints a greeting and exits",
          lambda: [P("hello")]),
    Guest("counter", "one counter printing 1..100 (continuity is guest-visible)",
          lambda: [P("counter", args=(100, 100_000))]),
    Guest("ticker", "a slow counter printing 1..60 for several seconds (for --after Ns)",
          lambda: [P("counter", args=(60, 2_500_000))]),
    Guest("multi", "three counters that the timer interleaves",
          lambda: [P("counter", args=(20, 300_000), as_name="counter-a"),
                   P("counter", args=(20, 300_000), as_name="counter-b"),
                   P("counter", args=(20, 300_000), as_name="counter-c")]),
    Guest("memcheck", "a memory checker over 64 pages, 50 generations",
          lambda: [P("memcheck", args=(50,))]),
    Guest("dirtier", "a page dirtier: 64 pages, 200 passes, one tick apart",
          lambda: [P("dirtier", args=(64, 200, 1))]),
    Guest("crashers", "processes that fault in every way, and a counter that survives them",
          lambda: [P("crasher", args=(i,), as_name=f"crasher{i}") for i in range(7)]
          + [P("counter", args=(10, 50_000))]),
    Guest("compute", "two compute loops (the benchmark's workload)",
          lambda: [P("compute", args=(2_000_000,), as_name="compute-a"),
                   P("compute", args=(2_000_000,), as_name="compute-b")]),
    Guest("secret", "the secret keeper, protected, beside a protected counter (honest kernel)",
          lambda: [P("keeper", data_pages=3, args=(5, 1)),
                   P("counter", data_pages=1, args=(10, 100_000, 1), as_name="pcounter")]),
    Guest("migrate-lab", "migration lab: the protected secret keeper beside an unprotected counter "
          "(docs/lab-migration.md)",
          # the keeper outlives any migration the lab starts (a round a tick: 150 ticks,
          # like the counter's 40 lines), so its protection is there to be refused
          lambda: [P("keeper", data_pages=3, args=(150, 1)), P("counter", args=(40, 200_000))]),
    _lab("snoop", "reads"),
    _lab("tamper", "overwrites"),
    _lab("regs", "changes the saved registers of"),
    _lab("swap", "swaps the pages of"),
    Guest("attack-channel", "attack lab: a kernel that learns the protected oracle's secret byte "
          "from its page faults (the controlled channel)",
          lambda: [P("oracle"), P("counter", args=(8, 100_000))], kernel="channel"),
]}


def get_guest(name: str) -> Guest:
    try:
        return GUESTS[name]
    except KeyError:
        raise KeyError(f"no built-in guest {name!r}; try one of: {', '.join(GUESTS)}") from None
