"""Guest-visible state, read the way the guest itself would see it.

The process table is the guest kernel's (``proc_table``, layout in
``minivmm.abi`` and docs/guest-abi.md), not the VMM's bookkeeping: a test
that asserts on it asserts on what the guest believes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from minivmm import abi


@dataclass(frozen=True)
class GuestProcess:
    slot: int
    pid: int
    name: str
    state: str
    exit_status: int
    cr3: int
    eip: int                # saved user eip (where it will resume)
    fault_vector: int
    fault_address: int


def process_table(machine) -> list[GuestProcess]:
    """Every used slot of the guest kernel's process table."""
    base = machine.image.kernel_symbols.get("proc_table")
    if base is None:
        raise LookupError("this guest's kernel has no 'proc_table' symbol")
    raw = machine.ram.read(base, abi.NPROC * abi.PROC_SIZE)    # kernel is identity mapped
    out = []
    for slot in range(abi.NPROC):
        rec = raw[slot * abi.PROC_SIZE:(slot + 1) * abi.PROC_SIZE]
        state, pid, cr3, _, status = struct.unpack_from("<5I", rec)
        if state == abi.P_UNUSED:
            continue
        eip = struct.unpack_from("<I", rec, abi.PROC_FRAME + abi.FRAME_EIP)[0]
        fvec, faddr = struct.unpack_from("<II", rec, abi.PROC_FAULT_VEC)
        name = rec[abi.PROC_NAME:abi.PROC_NAME + 16].split(b"\0", 1)[0].decode("ascii", "replace")
        out.append(GuestProcess(slot, pid, name, abi.PROC_STATE_NAMES.get(state, f"?{state}"),
                                status, cr3, eip, fvec, faddr))
    return out
