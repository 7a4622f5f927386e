"""Which frames the guest's processes use, from their page tables.

The same two-level non-PAE x86 tables :func:`minivmm.mmu.walk` translates
one address through (its constants, its rules: U/S must be granted at both
levels, a 4 MiB PDE maps 1024 frames, a frame past the end of RAM maps
nothing); here every entry of a directory is read at once, as arrays, to
list the frames rather than translate one address.  Runs on an engine
thread while the stepper holds the guest; reads only the RAM buffer.
"""

from __future__ import annotations

import numpy as np

from minivmm.mmu import PAGE_MASK, PTE_P, PTE_PS, PTE_U

LIVE = ("runnable", "sleeping")     # an exited or killed process maps nothing any more


def user_frames(ram, cr3s) -> np.ndarray:
    """Bool per frame: mapped user-accessible by one of the page directories
    ``cr3s``, or one of their page-table frames (the directory and the tables
    its present entries point to).  Entries pointing past RAM are ignored."""
    n = ram.npages
    words = ram.array.view("<u4").reshape(n, 1024)
    out = np.zeros(n, dtype=bool)
    for cr3 in sorted(set(int(c) for c in cr3s)):
        pd_frame = (cr3 & PAGE_MASK) >> 12
        if pd_frame >= n:
            continue
        out[pd_frame] = True
        pd = words[pd_frame]
        present = (pd & PTE_P) != 0
        big = present & ((pd & PTE_PS) != 0)
        # 4 MiB pages: 1024 frames each (only when the PDE grants U).
        for pde in pd[big & ((pd & PTE_U) != 0)].tolist():
            first = (pde & 0xFFC00000) >> 12
            out[first:min(n, first + 1024)] = True
        tables = present & ~big
        pt_frames = (pd[tables] >> 12).astype(np.int64)
        user_pde = ((pd[tables] & PTE_U) != 0)
        inside = pt_frames < n
        out[pt_frames[inside]] = True
        sel = pt_frames[inside & user_pde]
        if len(sel):
            ptes = words[sel]                                   # (tables, 1024): one gather
            ok = (ptes & (PTE_P | PTE_U)) == (PTE_P | PTE_U)
            frames = (ptes[ok] >> 12).astype(np.int64)
            out[frames[frames < n]] = True
    return out


def process_frames(machine) -> np.ndarray | None:
    """:func:`user_frames` of the live processes in the guest kernel's own
    process table; None when the guest has no process table to read."""
    try:
        procs = machine.processes()
    except LookupError:
        return None
    return user_frames(machine.ram, [p.cr3 for p in procs if p.state in LIVE])
