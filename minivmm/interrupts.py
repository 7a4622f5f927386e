"""Interrupt and exception delivery, done by the VMM as the CPU would.

Unicorn never vectors through the guest IDT: every ``int n`` and exception
arrives in a hook, and timer interrupts do not exist for it at all
(DESIGN §8).  So the VMM reads the gate from the guest's IDT, switches to the
kernel stack from the TSS on a ring 3 -> 0 transition, pushes the frame the
Intel SDM prescribes (SS, ESP when the privilege changes; EFLAGS, CS, EIP;
an error code for the vectors that have one), clears IF for interrupt gates
and jumps to the handler.  A delivery that fails becomes #DF, and a failing
#DF is a triple fault.
"""

from __future__ import annotations

import struct

from unicorn import UcError

from minivmm import abi
from minivmm.cpu import CpuState, read_cpu, write_cpu
from minivmm.errors import TripleFault
from minivmm.mmu import WalkFault, read_linear, walk

EFLAGS_TF, EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


class DeliveryError(Exception):
    """The gate, the TSS or the kernel stack is unusable."""


def kernel_read(ram, cpu: CpuState, vaddr: int, length: int, touch=None) -> bytes:
    """Read linear memory as the CPU would at CPL0 (for IDT, TSS).

    ``touch(frame)`` is called before each frame is read or written: these
    accesses bypass the TLB, so process protection must see them here (a
    hostile kernel may point its IDT, TSS or kernel stack at a protected page)."""
    if not cpu.cr0 & (1 << 31):
        start = vaddr & 0xFFFFFFFF
        if start + length > ram.size:
            raise DeliveryError(f"physical range at {start:#x} is outside RAM (paging off)")
        if touch is not None:
            last = start + max(length, 1) - 1
            for frame in range(start >> 12, (last >> 12) + 1):
                touch(frame)
        return ram.read(start, length)
    try:
        return read_linear(ram, cpu.cr3, vaddr & 0xFFFFFFFF, length, user=False,
                           wp=bool(cpu.cr0 & (1 << 16)), touch=touch)
    except WalkFault:
        raise DeliveryError(f"linear address range at {vaddr:#x} is not mapped for the kernel") from None


def kernel_write(ram, cpu: CpuState, vaddr: int, data: bytes, touch=None) -> None:
    """Write linear memory at CPL0; ``ram.write`` marks the pages dirty."""
    off = 0
    while off < len(data):
        chunk = min(len(data) - off, 0x1000 - (vaddr & 0xFFF))
        paddr = _translate(ram, cpu, vaddr, write=True)
        if touch is not None:
            touch(paddr >> 12)
        ram.write(paddr, data[off:off + chunk])
        vaddr, off = vaddr + chunk, off + chunk


def _translate(ram, cpu: CpuState, vaddr: int, write: bool) -> int:
    vaddr &= 0xFFFFFFFF
    if not cpu.cr0 & (1 << 31):
        if vaddr + 0x1000 - (vaddr & 0xFFF) > ram.size:
            raise DeliveryError(f"physical address {vaddr:#x} is outside RAM (paging off)")
        return vaddr
    try:
        page, _ = walk(ram, cpu.cr3, vaddr, write=write, user=False, wp=bool(cpu.cr0 & (1 << 16)))
    except WalkFault:
        raise DeliveryError(f"linear address {vaddr:#x} is not mapped for the kernel") from None
    return page | (vaddr & 0xFFF)


def deliver(uc, ram, mmu, vector: int, *, error_code: int | None = None,
            software: bool = False, cpu: CpuState | None = None,
            clean_context=None, touch=None) -> CpuState:
    """Deliver ``vector`` to the guest; returns the CPU state it entered with.

    ``clean_context`` (a ``UcContext`` saved at boot) is restored first after
    a real exception: Unicorn never resets QEMU's ``old_exception``, so the
    next fault would otherwise be reported as a double fault (upstream
    issue #1883).
    """
    cpu = cpu or read_cpu(uc)
    try:
        new = _frame(ram, cpu, vector, error_code, software, touch)
    except DeliveryError as first:
        if vector == abi.VEC_DF:
            raise TripleFault(f"cannot deliver #DF: {first}") from None
        try:
            new = _frame(ram, cpu, abi.VEC_DF, 0, False, touch)
        except DeliveryError as second:
            raise TripleFault(f"cannot deliver vector {vector:#x} ({first}) nor #DF ({second}); "
                              f"eip {cpu.eip:#x} cr0 {cpu.cr0:#x} cr2 {cpu.cr2:#x}") from None
    if clean_context is not None:
        uc.context_restore(clean_context)
    try:
        write_cpu(uc, mmu, new)
    except UcError as exc:
        # A descriptor the checks above let through that the CPU still
        # refuses: the guest's tables are broken; a real CPU would shut down.
        raise TripleFault(f"loading the handler's state for vector {vector:#x} failed: {exc}") from None
    if mmu.bad_machine_access is not None:
        addr, mmu.bad_machine_access = mmu.bad_machine_access, None
        raise TripleFault(f"descriptor load for vector {vector:#x} read unmapped {addr:#x}")
    return new


CODE, STACK = "code", "stack"


def _check_descriptor(ram, cpu: CpuState, selector: int, kind: str, touch, what: str) -> None:
    """The checks the CPU makes before it loads a handler's CS or its SS0
    (Intel SDM vol. 3, 6.12.1), for the one shape the VMM delivers to: a
    ring-0 handler.  CS: a present code segment of DPL 0; SS0: RPL 0, a
    present writable data segment of DPL 0.  Any other is a fault in the
    delivery (then #DF, then a triple fault), never a VMM error."""
    if selector & ~7 == 0:
        raise DeliveryError(f"{what} {selector:#x} is a null selector")
    if selector & 4:
        raise DeliveryError(f"{what} {selector:#x} is in the LDT (only GDT handlers are delivered)")
    if (selector & ~7) + 7 > cpu.gdt_limit:
        raise DeliveryError(f"{what} {selector:#x} is beyond the GDT limit {cpu.gdt_limit:#x}")
    lo, hi = struct.unpack("<II", kernel_read(ram, cpu, cpu.gdt_base + (selector & ~7), 8, touch))
    present, dpl, system, code = hi & 0x8000, (hi >> 13) & 3, not hi & 0x1000, hi & 0x800
    if not present:
        raise DeliveryError(f"{what} {selector:#x}: descriptor not present")
    if system or dpl != 0:
        raise DeliveryError(f"{what} {selector:#x}: not a DPL 0 code or data segment")
    if kind == CODE and not code:
        raise DeliveryError(f"{what} {selector:#x}: not a code segment")
    if kind == STACK and (code or not hi & 0x200 or selector & 3):
        raise DeliveryError(f"{what} {selector:#x}: not a writable ring-0 data segment")


def _frame(ram, cpu: CpuState, vector: int, error_code: int | None, software: bool,
           touch=None) -> CpuState:
    if vector * 8 + 7 > cpu.idt_limit:
        raise DeliveryError(f"vector {vector:#x} is beyond the IDT limit {cpu.idt_limit:#x}")
    lo, hi = struct.unpack("<II", kernel_read(ram, cpu, cpu.idt_base + vector * 8, 8, touch))
    gate_type, dpl, present = (hi >> 8) & 0xF, (hi >> 13) & 3, hi & 0x8000
    if not present:
        raise DeliveryError(f"IDT gate {vector:#x} is not present")
    if gate_type not in (GATE_INTERRUPT, GATE_TRAP):
        raise DeliveryError(f"IDT gate {vector:#x} has type {gate_type:#x}, not an interrupt/trap gate")
    cpl = cpu.cpl
    if software and dpl < cpl:
        # int n through a gate the caller may not use: #GP with the IDT index.
        return _frame(ram, cpu, abi.VEC_GP, vector * 8 + 2, False, touch)
    selector = (lo >> 16) & 0xFFFF
    handler = (hi & 0xFFFF0000) | (lo & 0xFFFF)
    _check_descriptor(ram, cpu, selector, CODE, touch, f"IDT gate {vector:#x}'s code selector")

    words: list[int] = []
    if cpl != 0:
        # Privilege change: the handler runs on the kernel stack from the TSS.
        if cpu.tr_limit < 9:
            raise DeliveryError("no TSS loaded: cannot find the kernel stack")
        esp0, ss0 = struct.unpack("<II", kernel_read(ram, cpu, cpu.tr_base + 4, 8, touch))
        ss0 &= 0xFFFF
        _check_descriptor(ram, cpu, ss0, STACK, touch, "TSS SS0")
        words += [cpu.ss, cpu.esp]
        esp, ss = esp0, ss0
    else:
        esp, ss = cpu.esp, cpu.ss
    words += [cpu.eflags, cpu.cs, cpu.eip]
    if error_code is not None and vector in abi.ERROR_CODE_VECTORS:
        words.append(error_code)
    esp = (esp - 4 * len(words)) & 0xFFFFFFFF
    # Pushed in order, so the first word ends up at the highest address.
    kernel_write(ram, cpu, esp, struct.pack(f"<{len(words)}I", *reversed(words)), touch)
    eflags = cpu.eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
    if gate_type == GATE_INTERRUPT:
        eflags &= ~EFLAGS_IF
    return cpu.replace(cs=selector, ss=ss, esp=esp, eip=handler, eflags=eflags)
