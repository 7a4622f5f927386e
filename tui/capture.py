"""Snapshots of a running host, taken on an engine thread.

Called only while the stepper holds the engines (the source's guest between
two slices), so a Machine is read at a quiet moment; the result is a frozen
:class:`tui.model.HostView` that holds no reference into the machine.  Reads
never disturb the guest: guest memory is read from the RAM buffer, never
through the VMM's own accessors (which would cloak protected pages as a
"VMM access"), and a protected code page is not disassembled at all.
"""

from __future__ import annotations

import capstone
import numpy as np

from migrate.residency import untouched
from minivmm.mmu import WalkFault, read_linear
from tui.pagewalk import process_frames
from tui.model import (CLOAKED, CONTENT_ORDER, DIRTY, PLAIN, SENT, TRANSFER_ORDER, HostView,
                       MemoryMap, Proc)

PAGE = 4096
SCAN = 4096                 # pages tested for zero at once
CONSOLE_LINES = 40
REGISTERS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags", "cr3", "cs")
_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)

_C = {c: i for i, c in enumerate(CONTENT_ORDER)}
_T = {t: i for i, t in enumerate(TRANSFER_ORDER)}


def used_pages(ram) -> np.ndarray:
    """Bool per frame: holds a non-zero byte.  Frames the host never backed are skipped unread."""
    n = ram.npages
    pages = ram.array.reshape(-1, PAGE)
    fresh = untouched(ram.host_address, n)
    used = np.zeros(n, dtype=bool)
    for a in range(0, n, SCAN):
        b = min(n, a + SCAN)
        if fresh is not None and fresh[a:b].all():
            continue
        used[a:b] = pages[a:b].view(np.uint64).max(axis=1) != 0
    return used


def content(ram, *, protected: dict, user: np.ndarray | None) -> np.ndarray:
    """Content code (index into CONTENT_ORDER) per frame: user where ``user``
    (the processes' page-table walk) says so, else kernel if the frame holds
    anything, else free; protected frames as their state says."""
    used = used_pages(ram)
    codes = np.where(used, _C["k"], _C["f"]).astype(np.uint8)
    if user is not None:
        codes[user] = _C["u"]
    for frame, (_, meta) in protected.items():
        if 0 <= frame < ram.npages:
            codes[frame] = _C[CLOAKED] if meta.state == "cloaked" else _C[PLAIN]
    return codes


_CONTENT_CH = np.frombuffer("".join(CONTENT_ORDER).encode(), np.uint8)
_TRANSFER_CH = np.frombuffer("".join(TRANSFER_ORDER).encode(), np.uint8)


def memory_map(codes: np.ndarray, sent: np.ndarray | None, dirty: np.ndarray | None) -> MemoryMap:
    """One cell per frame (the screen merges cells and zooms)."""
    n = len(codes)
    trans = np.zeros(n, np.uint8)
    if sent is not None:
        trans[sent[:n].astype(bool)] = _T[SENT]
    if dirty is not None:
        trans[dirty[:n].astype(bool)] = _T[DIRTY]
    out = np.empty((n, 2), np.uint8)
    out[:, 0], out[:, 1] = _CONTENT_CH[codes], _TRANSFER_CH[trans]
    return MemoryMap(n, 1, out.tobytes().decode("ascii"))


def _disasm(machine, cpu, protected: dict) -> tuple[str, ...]:
    def touch(frame):
        if frame in protected:
            raise PermissionError(frame)
    try:
        code = read_linear(machine.ram, cpu.cr3, cpu.eip, 40, user=False, touch=touch)
    except PermissionError:
        return (f"{cpu.eip:08x}  (a protected page: the VMM shows no plaintext code)",)
    except WalkFault:
        return (f"{cpu.eip:08x}  (not mapped)",)
    out = []
    for ins in _CS.disasm(code, cpu.eip):
        out.append(f"{ins.address:08x}  {ins.mnemonic} {ins.op_str}".rstrip())
        if len(out) == 8:
            break
    return tuple(out) or (f"{cpu.eip:08x}  (no instruction decodes here)",)


def _processes(machine) -> tuple[Proc, ...]:
    prot = {v.pid: v for v in machine.protection.view()}
    try:
        table = machine.processes()
    except LookupError:
        table = []
    rows = []
    for p in table:
        v = prot.get(p.pid)
        if v is None:
            pr = "-"
        elif v.stopped:
            pr = f"STOPPED: {v.stopped}"
        else:
            c = sum(1 for pg in v.pages if pg.state == "cloaked")
            pr = f"protected ({len(v.pages)} pages: {len(v.pages) - c} plain, {c} cloaked)"
        rows.append(Proc(p.pid, p.name, p.state, pr))
    return tuple(rows)


def _console(machine) -> tuple[str, ...]:
    tail = bytes(machine.console.output[-4000:]).decode("utf-8", "replace")
    return tuple(tail.split("\n")[-CONSOLE_LINES:])


def machine_view(role: str, status: str, machine, *, sent=None, dirty=None, all_sent=False) -> HostView:
    protected = dict(machine.protection.frames)      # one C-level copy: safe beside another thread
    codes = content(machine.ram, protected=protected, user=process_frames(machine))
    if all_sent:
        sent = np.ones(len(codes), dtype=bool)
    cpu = machine.cpu()
    regs = tuple((r, getattr(cpu, r)) for r in REGISTERS)
    return HostView(role, status, machine.vclock, memory_map(codes, sent, dirty), regs,
                    _disasm(machine, cpu, protected), _processes(machine), _console(machine))


def source_view(status: str, machine, source=None) -> HostView:
    sent = source.hashes.seen if source is not None else None
    dirty = machine.ram.dirty.bitmap if machine.ram.dirty.enabled else None
    return machine_view("source", status, machine, sent=sent, dirty=dirty)


def destination_view(status: str, dest=None, machine=None) -> HostView:
    """Before the machine is restored: the RAM as it arrives (received = its page arrived)."""
    if machine is not None:
        return machine_view("destination", status, machine, all_sent=True)
    if dest is None or dest.ram is None:
        return HostView("destination", status)
    # Not restored yet: no CPU, no process table to walk; a received page is
    # "kernel / other non-zero" or free until B's machine exists.
    codes = np.where(used_pages(dest.ram), _C["k"], _C["f"]).astype(np.uint8)
    return HostView("destination", status, 0, memory_map(codes, dest.hashes.seen.copy(), None))
