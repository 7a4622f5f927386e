"""What "the same virtual address" depends on beyond the page tables.

A protected process's addresses go through its segment descriptors (base,
limit, type) before they reach the page tables, and the CPU caches each
descriptor when a selector is loaded.  The kernel owns the GDT and LDT, so it
could change the descriptor behind an unchanged selector (say SS's base
moved onto the process's secret page) and every register the VMM checks
would still look right.  So HC_PROTECT records, per segment register, the
selector and the 8 descriptor bytes behind it (from the GDT or, for a TI=1
selector, the LDT), plus the CR0 bits that decide how addresses translate;
every return to the process compares the tables with the record (a
difference stops it: integrity violation), and the VMM then reloads every
segment register from the validated tables (``cpu.write_cpu``), so a cache
the kernel loaded from a table it changed back is replaced too.

The accessed bit (descriptor byte 5, bit 0) is masked: the CPU sets it
itself on every load.
"""

from __future__ import annotations

from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CS, UC_X86_REG_DS,
                               UC_X86_REG_ES, UC_X86_REG_FS, UC_X86_REG_GDTR, UC_X86_REG_GS,
                               UC_X86_REG_LDTR, UC_X86_REG_SS)

from minivmm.cpu import CpuState
from minivmm.interrupts import DeliveryError, kernel_read

SEGMENTS = (("cs", UC_X86_REG_CS), ("ss", UC_X86_REG_SS), ("ds", UC_X86_REG_DS),
            ("es", UC_X86_REG_ES), ("fs", UC_X86_REG_FS), ("gs", UC_X86_REG_GS))
CR0_PINNED = (1 << 0) | (1 << 16) | (1 << 31)      # PE, WP, PG: how addresses translate
NULL, OUTSIDE, UNMAPPED = "null", "outside the table", "table not mapped"


def snapshot(uc, ram, touch, selectors: dict[str, int] | None = None, cr3: int | None = None) -> dict:
    """The pinned state now (JSON-able: it is part of the protection state).
    ``selectors``/``cr3``: already read by the caller (saves engine calls on
    the return path).  Each table is read once, over the span its selectors
    cover."""
    cr0 = uc.reg_read(UC_X86_REG_CR0)
    cpu = CpuState(cr0=cr0, cr3=uc.reg_read(UC_X86_REG_CR3) if cr3 is None else cr3)
    if selectors is None:
        selectors = {name: uc.reg_read(reg) for name, reg in SEGMENTS}
    sels = {name: selectors[name] & 0xFFFF for name, _ in SEGMENTS}
    segs: dict[str, list] = {}
    for ldt in (False, True):
        wanted = [n for n, sel in sels.items() if bool(sel & 4) == ldt]
        if not wanted:
            continue
        _, base, limit, _ = uc.reg_read(UC_X86_REG_LDTR if ldt else UC_X86_REG_GDTR)
        inside = []
        for name in wanted:
            sel = sels[name]
            if sel & ~3 == 0:
                segs[name] = [sel, NULL]
            elif (sel & ~7) + 7 > limit:
                segs[name] = [sel, OUTSIDE]
            else:
                inside.append(name)
        if not inside:
            continue
        lo = min(sels[n] & ~7 for n in inside)
        hi = max(sels[n] & ~7 for n in inside) + 8
        try:
            table = kernel_read(ram, cpu, base + lo, hi - lo, touch)
        except DeliveryError:
            table = None
        for name in inside:
            sel = sels[name]
            if table is None:
                segs[name] = [sel, UNMAPPED]
                continue
            raw = bytearray(table[(sel & ~7) - lo:(sel & ~7) - lo + 8])
            raw[5] &= 0xFE
            segs[name] = [sel, raw.hex()]
    return {"cr0": cr0 & CR0_PINNED, "segments": {n: segs[n] for n, _ in SEGMENTS}}


def differences(pinned: dict, now: dict) -> list[str]:
    out = []
    if pinned["cr0"] != now["cr0"]:
        out.append(f"CR0 {pinned['cr0']:#x} -> {now['cr0']:#x}")
    for name, _ in SEGMENTS:
        (s0, d0), (s1, d1) = pinned["segments"][name], now["segments"][name]
        if d0 != d1 or s0 != s1:
            out.append(f"{name} {s0:#x}:{d0} -> {s1:#x}:{d1}")
    return out


def check(pinned) -> dict:
    """Validate a pinned record read from a state file (bounded, typed)."""
    if not isinstance(pinned, dict) or set(pinned) != {"cr0", "segments"}:
        raise ValueError("protection state: bad pinned descriptors")
    segs = pinned["segments"]
    if not isinstance(pinned["cr0"], int) or not isinstance(segs, dict) \
            or set(segs) != {n for n, _ in SEGMENTS}:
        raise ValueError("protection state: bad pinned descriptors")
    for sel, desc in segs.values():
        if not isinstance(sel, int) or not 0 <= sel <= 0xFFFF or not isinstance(desc, str) \
                or not (desc in (NULL, OUTSIDE, UNMAPPED) or len(desc) == 16):
            raise ValueError("protection state: bad pinned descriptor")
    return {"cr0": pinned["cr0"], "segments": {n: [s, d] for n, (s, d) in segs.items()}}


