"""CPU register state: read it out of Unicorn, and load it back in.

Loading is the delicate part.  ``reg_write(CS/SS)`` goes through QEMU's
``load_seg``, which applies the protected-mode privilege checks at the
*current* CPL, so the VMM cannot just write ring-0 selectors while the guest
sits in ring 3 (DESIGN §8).  Two verified tricks:

* to land at CPL0: clear CR0.PE, ``reg_write(SS, 0)`` (a real-mode load makes
  CPL 0), restore CR0, then write the selectors;
* to land at CPL3: set EFLAGS.VM, write SS (in virtual-8086 mode CPL is 3),
  clear VM, then write the selectors.

Descriptor loads read the GDT through the TLB fill hook, so every write runs
with ``mmu.machine_call`` set (a refused fill there corrupts the interpreter).
FPU/SSE state is not modelled: the toy OS never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from unicorn.x86_const import (
    UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_CS,
    UC_X86_REG_DS, UC_X86_REG_EAX, UC_X86_REG_EBP, UC_X86_REG_EBX, UC_X86_REG_ECX,
    UC_X86_REG_EDI, UC_X86_REG_EDX, UC_X86_REG_EFLAGS, UC_X86_REG_EIP, UC_X86_REG_ES,
    UC_X86_REG_ESI, UC_X86_REG_ESP, UC_X86_REG_FS, UC_X86_REG_GDTR, UC_X86_REG_GS,
    UC_X86_REG_IDTR, UC_X86_REG_SS, UC_X86_REG_TR)

CR0_PE = 1
EFLAGS_VM = 1 << 17
EFLAGS_IF = 1 << 9
TSS_AVAILABLE = 0x8900              # TR flags: present, type 9; 0x8B00 (busy) aborts

GP_REGS = {"eax": UC_X86_REG_EAX, "ebx": UC_X86_REG_EBX, "ecx": UC_X86_REG_ECX,
           "edx": UC_X86_REG_EDX, "esi": UC_X86_REG_ESI, "edi": UC_X86_REG_EDI,
           "ebp": UC_X86_REG_EBP, "esp": UC_X86_REG_ESP}
SEG_REGS = {"cs": UC_X86_REG_CS, "ss": UC_X86_REG_SS, "ds": UC_X86_REG_DS,
            "es": UC_X86_REG_ES, "fs": UC_X86_REG_FS, "gs": UC_X86_REG_GS}


@dataclass(frozen=True)
class CpuState:
    """Architectural state of the guest CPU (versioned with the machine state)."""

    VERSION = 1
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    esi: int = 0
    edi: int = 0
    ebp: int = 0
    esp: int = 0
    eip: int = 0
    eflags: int = 0x2
    cs: int = 0
    ss: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    gdt_base: int = 0
    gdt_limit: int = 0
    idt_base: int = 0
    idt_limit: int = 0
    tr: int = 0
    tr_base: int = 0
    tr_limit: int = 0

    @property
    def cpl(self) -> int:
        return self.ss & 3

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CpuState":
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"CPU state fields differ: missing {sorted(names - set(data))}, "
                             f"unknown {sorted(set(data) - names)}")
        for name, value in data.items():
            if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"CPU register {name} = {value!r} is not a u32")
        return cls(**data)

    def replace(self, **changes) -> "CpuState":
        return replace(self, **changes)


def read_cpu(uc) -> CpuState:
    values = {name: uc.reg_read(reg) for name, reg in GP_REGS.items()}
    values.update({name: uc.reg_read(reg) for name, reg in SEG_REGS.items()})
    _, gbase, glimit, _ = uc.reg_read(UC_X86_REG_GDTR)
    _, ibase, ilimit, _ = uc.reg_read(UC_X86_REG_IDTR)
    tsel, tbase, tlimit, _ = uc.reg_read(UC_X86_REG_TR)
    return CpuState(eip=uc.reg_read(UC_X86_REG_EIP), eflags=uc.reg_read(UC_X86_REG_EFLAGS),
                    cr0=uc.reg_read(UC_X86_REG_CR0), cr2=uc.reg_read(UC_X86_REG_CR2),
                    cr3=uc.reg_read(UC_X86_REG_CR3), cr4=uc.reg_read(UC_X86_REG_CR4),
                    gdt_base=gbase, gdt_limit=glimit, idt_base=ibase, idt_limit=ilimit,
                    tr=tsel, tr_base=tbase, tr_limit=tlimit, **values)


def write_cpu(uc, mmu, st: CpuState) -> None:
    """Load ``st`` into the CPU, whatever CPL it is at now."""
    mmu.machine_call = True
    try:
        uc.reg_write(UC_X86_REG_GDTR, (0, st.gdt_base, st.gdt_limit, 0))
        uc.reg_write(UC_X86_REG_IDTR, (0, st.idt_base, st.idt_limit, 0))
        uc.reg_write(UC_X86_REG_CR4, st.cr4)
        uc.reg_write(UC_X86_REG_CR3, st.cr3)
        uc.reg_write(UC_X86_REG_CR0, st.cr0)
        if st.cpl == 0:
            uc.reg_write(UC_X86_REG_CR0, st.cr0 & ~CR0_PE)
            uc.reg_write(UC_X86_REG_SS, 0)
            uc.reg_write(UC_X86_REG_CR0, st.cr0)
        else:
            uc.reg_write(UC_X86_REG_EFLAGS, EFLAGS_VM | 0x2)
            uc.reg_write(UC_X86_REG_SS, st.ss)
            uc.reg_write(UC_X86_REG_EFLAGS, 0x2)
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            uc.reg_write(SEG_REGS[name], getattr(st, name))
        if st.tr:
            uc.reg_write(UC_X86_REG_TR, (st.tr, st.tr_base, st.tr_limit, TSS_AVAILABLE))
        for name, reg in GP_REGS.items():
            uc.reg_write(reg, getattr(st, name))
        uc.reg_write(UC_X86_REG_CR2, st.cr2)
        uc.reg_write(UC_X86_REG_EFLAGS, st.eflags)
        uc.reg_write(UC_X86_REG_EIP, st.eip)
    finally:
        mmu.machine_call = False
