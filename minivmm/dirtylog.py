"""Write-protect dirty logging, the way pre-copy live migration needs it.

While logging is on, the MMU grants write permission to a TLB entry only on a
fill caused by a write, and marks the frame dirty there; starting a log and
each fetch-and-clear flush the TLB so that every page must fault again to
be written (there is no soft-dirty bit on these hosts, DESIGN §8).  Writes the
VMM makes to RAM directly are marked by ``GuestRAM.write``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minivmm.abi import PAGE_SIZE


@dataclass(frozen=True)
class DirtyLogState:
    VERSION = 1
    enabled: bool
    dirty_pfns: tuple[int, ...]


class DirtyLog:
    def __init__(self, npages: int):
        self.enabled = False
        self.bitmap = np.zeros(npages, dtype=bool)

    def mark(self, pfn: int) -> None:
        if self.enabled:
            self.bitmap[pfn] = True

    def mark_range(self, paddr: int, length: int) -> None:
        if self.enabled:
            self.bitmap[paddr // PAGE_SIZE:(paddr + length - 1) // PAGE_SIZE + 1] = True

    def start(self) -> None:
        self.bitmap[:] = False
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def fetch_and_clear(self) -> np.ndarray:
        """Frame numbers written since the last fetch (or start), ascending."""
        pfns = np.flatnonzero(self.bitmap)
        self.bitmap[:] = False
        return pfns

    def peek(self) -> np.ndarray:
        return np.flatnonzero(self.bitmap)

    def save(self) -> DirtyLogState:
        return DirtyLogState(self.enabled, tuple(int(p) for p in np.flatnonzero(self.bitmap)))

    def restore(self, state: DirtyLogState) -> None:
        self.enabled = state.enabled
        self.bitmap[:] = False
        for pfn in state.dirty_pfns:
            if not 0 <= pfn < len(self.bitmap):
                raise ValueError(f"dirty page {pfn} outside RAM of {len(self.bitmap)} pages")
            self.bitmap[pfn] = True
