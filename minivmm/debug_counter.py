"""Instruction-exact stops for a debugger: breakpoints and single steps.

Deterministic mode keeps virtual time by slices (``timer.py``): a slice
that runs its whole budget advances the clock by the budget, one that ends
early (a trap) by a fixed cost.  A debugger that stopped the guest part way
through a slice must therefore know exactly how many instructions ran, so
that the rest of the slice runs later with the rest of the budget and every
timer tick still lands on the same instruction as in a run without a
debugger.  Unicorn does not report how many instructions ran, so while a
debugger needs exact stops this module's ``UC_HOOK_CODE`` hook counts them
itself, and stops the slice (``emu_stop`` from a code hook stops *before*
the instruction runs) at the budget, at a breakpoint, or after a step.
It counts exactly what Unicorn's own ``count=`` counts: code-hook calls.

Breakpoints are these hook checks, never an ``int3`` written into guest
memory: the guest reads the same bytes and computes the same results.  A
Python code hook costs ~1.5 M instructions/s (DESIGN §8), so the hook is
installed only while breakpoints exist or a step is running.
"""

from __future__ import annotations

from unicorn import UC_HOOK_CODE

BREAK, LIMIT = "break", "limit"


class InstructionCounter:
    """Installed on a machine as ``machine.counter`` by :meth:`install`."""

    def __init__(self):
        self.breakpoints: set[int] = set()
        self.step_limit: int | None = None      # stop after this many instructions
        self.skip_once: int | None = None       # resuming at a breakpoint: run it first
        self._budget: int | None = None
        self._armed = False
        self.ran = 0
        self.why: str | None = None
        self._machine = None
        self._handle = None

    # -------------------------------------------------------- machine side
    def install(self, machine) -> None:
        if self._handle is not None:
            return
        self._machine = machine
        self._handle = machine._uc.hook_add(UC_HOOK_CODE, self._hook)
        # Translated blocks carry their hook calls: drop the ones made without it.
        machine.flush_translations()
        machine.counter = self

    def uninstall(self) -> None:
        if self._handle is None:
            return
        m = self._machine
        m._uc.hook_del(self._handle)
        m.flush_translations()
        m.counter = None
        self._handle = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def arm(self, budget: int | None) -> None:
        """Before a slice: it may run ``budget`` instructions (None: no bound)."""
        self.ran, self.why = 0, None
        self._armed = True
        self._budget = budget
        if self.step_limit is not None:
            self._budget = self.step_limit if budget is None else min(budget, self.step_limit)

    def disarm(self) -> tuple[int, str | None]:
        """After a slice: (instructions run, BREAK/LIMIT/None)."""
        ran, why = self.ran, self.why
        if self.step_limit is not None and why in (LIMIT, None):
            self.step_limit -= ran
        self._budget = None
        self._armed = False
        # The skip covers only the first instruction after a resume, and
        # that one belonged to this slice (or never ran: then a later visit
        # to the address is a real hit).
        self.skip_once = None
        return ran, why

    def _hook(self, uc, address, size, user_data):
        # The hot path (one call per instruction): no wrapper frame, and the
        # body cannot raise (attribute reads, a set lookup, an int add), so
        # nothing can unwind through QEMU (machine._guarded's concern).
        if not self._armed:
            return              # a VMM probe outside a slice (machine._check_halt)
        ran = self.ran
        if ran == self._budget:
            self.why = LIMIT
            uc.emu_stop()
            return
        if address in self.breakpoints and not (ran == 0 and self.skip_once == address):
            self.why = BREAK
            uc.emu_stop()
            return
        self.ran = ran + 1
