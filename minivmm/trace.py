"""Instruction traces: ``minivmm run GUEST --trace FILE``.

A ``UC_HOOK_CODE`` hook sees every instruction before it runs; for the
instructions numbered ``start .. start+count-1`` (counted from 0 at the
start of this run, the way Unicorn's ``count=`` counts: one per hook call)
it writes one line::

    <n> <address> cpl<0|3> pid <pid> <bytes> <mnemonic operands> [registers]

``pid`` is the process whose address space is current (0 for the kernel,
from the VMM's pid map).  Instruction bytes are read without touching the
guest (``guestpeek``): an instruction in a protected page is written as
``(protected)``, not read.  The hook never stops a slice, so the guest runs
exactly as without the trace; it costs ~1.5 M instructions/s (a Python call
per instruction, DESIGN §8), so it is removed at the first slice boundary
after the window.
"""

from __future__ import annotations

from unicorn import UC_HOOK_CODE
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_EAX, UC_X86_REG_EBP,
                               UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDI, UC_X86_REG_EDX,
                               UC_X86_REG_EFLAGS, UC_X86_REG_ESI, UC_X86_REG_ESP, UC_X86_REG_SS)

from minivmm.guestpeek import PROTECTED, disasm_one, peek

TRACE_REGS = (("eax", UC_X86_REG_EAX), ("ebx", UC_X86_REG_EBX), ("ecx", UC_X86_REG_ECX),
              ("edx", UC_X86_REG_EDX), ("esi", UC_X86_REG_ESI), ("edi", UC_X86_REG_EDI),
              ("ebp", UC_X86_REG_EBP), ("esp", UC_X86_REG_ESP), ("eflags", UC_X86_REG_EFLAGS))


class Tracer:
    def __init__(self, machine, out, *, start: int = 0, count: int = 1000, registers: bool = False):
        self.machine, self.out = machine, out
        self.start, self.end, self.registers = start, start + count, registers
        self.n = 0
        self.written = 0
        self._handle = machine._uc.hook_add(UC_HOOK_CODE, machine._guarded(self._hook, None))
        machine.flush_translations()        # blocks translated before carry no hook call

    @property
    def done(self) -> bool:
        return self.n >= self.end

    def remove_if_done(self) -> None:
        """Between slices: drop the hook once the window is written."""
        if self._handle is not None and self.done:
            self.machine._uc.hook_del(self._handle)
            self.machine.flush_translations()
            self._handle = None

    def _hook(self, uc, address, size, user_data):
        n = self.n
        self.n = n + 1
        if n < self.start or n >= self.end:
            return
        cr0, cr3 = uc.reg_read(UC_X86_REG_CR0), uc.reg_read(UC_X86_REG_CR3)
        cpl = uc.reg_read(UC_X86_REG_SS) & 3
        pid = self.machine.pids.get(cr3 & 0xFFFFF000, 0) if cpl else 0
        code = peek(self.machine, cr0, cr3, address, size)
        if code == PROTECTED:
            text, raw = "(protected)", ""
        elif code is None:
            text, raw = "(not mapped)", ""
        else:
            text, raw = disasm_one(code, address), code.hex()
        line = f"{n} {address:#010x} cpl{cpl} pid {pid} {raw:<16} {text}"
        if self.registers:
            line += "  " + " ".join(f"{name}={uc.reg_read(reg):#x}" for name, reg in TRACE_REGS)
        self.out.write(line.rstrip() + "\n")
        self.written += 1
