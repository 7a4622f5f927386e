"""The VMM's MMU: Unicorn's virtual-TLB fill hook is the guest's page walker.

With ``UC_TLB_VIRTUAL`` Unicorn never walks the guest's page tables itself:
on every TLB miss it asks :meth:`Mmu.fill` for the physical page and the
permissions.  So this module *is* the x86 two-level (non-PAE) walk: it
enforces U/S and R/W (and CR0.WP for the kernel), refuses fills that a real
MMU would fault on, and implements write-protect dirty logging.

A refused fill is not delivered to the guest: ``emu_start`` fails with
``UC_ERR_EXCEPTION`` at the faulting instruction, and the machine injects
#PF with the CR2 and error code recorded in :attr:`Mmu.fault`.  CR2 is the
page-aligned address (the hook is told pages, not bytes).

The walk does not set the Accessed/Dirty bits of guest PTEs (nothing in the
toy kernel reads them, and writing them would dirty page-table pages).
"""

from __future__ import annotations

import struct

from unicorn import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE
from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_SS

from minivmm.memory import GuestRAM

CR0_PG = 1 << 31
CR0_WP = 1 << 16
PTE_P, PTE_W, PTE_U, PTE_PS = 1, 2, 4, 0x80
PF_P, PF_W, PF_U = 1, 2, 4          # #PF error code bits
PAGE_MASK = 0xFFFFF000

_U32 = struct.Struct("<I").unpack_from


class WalkFault(Exception):
    def __init__(self, error_code: int):
        self.error_code = error_code


def walk(ram: GuestRAM, cr3: int, vaddr: int, *, write: bool, user: bool, wp: bool = True) -> tuple[int, bool]:
    """Translate ``vaddr``: return (physical page, writable at this privilege).

    Raises :class:`WalkFault` with the #PF error code a real CPU would push.
    """
    err = (PF_W if write else 0) | (PF_U if user else 0)
    view, size = ram.view, ram.size
    pde_addr = (cr3 & PAGE_MASK) + ((vaddr >> 22) << 2)
    if pde_addr + 4 > size:
        raise WalkFault(err)
    pde = _U32(view, pde_addr)[0]
    if not pde & PTE_P:
        raise WalkFault(err)
    if pde & PTE_PS:                        # 4 MiB page (CR4.PSE)
        flags = pde
        page = (pde & 0xFFC00000) | (vaddr & 0x003FF000)
    else:
        pte_addr = (pde & PAGE_MASK) + (((vaddr >> 12) & 0x3FF) << 2)
        if pte_addr + 4 > size:
            raise WalkFault(err)
        pte = _U32(view, pte_addr)[0]
        if not pte & PTE_P:
            raise WalkFault(err)
        flags = pde & pte                   # U and W must be granted at both levels
        page = pte & PAGE_MASK
    if user and not flags & PTE_U:
        raise WalkFault(err | PF_P)
    writable = bool(flags & PTE_W) or (not user and not wp)
    if write and not writable:
        raise WalkFault(err | PF_P)
    if page + 0x1000 > size:                # maps beyond RAM: like a bus error
        raise WalkFault(err | PF_P)
    return page, writable


def read_linear(ram: GuestRAM, cr3: int, vaddr: int, length: int, *, user: bool, wp: bool = True,
                touch=None) -> bytes:
    """Read ``length`` bytes at linear ``vaddr`` through the page tables at ``cr3``,
    page by page; raises :class:`WalkFault` at the first page that faults.
    ``touch(frame)`` is called before each frame is read (protection cloaks
    protected plaintext there: the VMM's own readers are "anyone else")."""
    out = bytearray()
    while length > 0:
        chunk = min(length, 0x1000 - (vaddr & 0xFFF))
        page, _ = walk(ram, cr3, vaddr, write=False, user=user, wp=wp)
        if touch is not None:
            touch(page >> 12)
        out += ram.read(page | (vaddr & 0xFFF), chunk)
        vaddr, length = (vaddr + chunk) & 0xFFFFFFFF, length - chunk
    return bytes(out)


class Mmu:
    """State and the fill hook.  ``machine_call`` is set while the VMM itself
    calls into Unicorn (descriptor loads in ``reg_write``): then a fill is
    never refused, because QEMU would longjmp past the Python frames."""

    def __init__(self, ram: GuestRAM):
        self.ram = ram
        self.machine_call = False
        self.fault: tuple[int, int] | None = None       # (cr2, error code) of a refused fill
        self.bad_machine_access: int | None = None
        self.protection = None          # minivmm.protection.Protection, set by the machine

    def fill(self, uc, vaddr, access, entry, data) -> bool:
        write = access == UC_MEM_WRITE
        cr0 = uc.reg_read(UC_X86_REG_CR0)
        if not cr0 & CR0_PG:                # paging off: physical = linear
            if vaddr + 0x1000 > self.ram.size:
                return self._refuse(entry, vaddr, PF_W if write else 0)
            prot = self.protection
            if prot is not None and prot.active:
                # Still the fill hook (virtual-TLB mode calls it with paging
                # off too): a physical access is never the owner's, so it
                # goes through the same policy as anyone else's.
                if self.machine_call:
                    prot.touch_frame(vaddr >> 12, "vmm descriptor load")
                else:
                    verdict = prot.on_physical(uc, vaddr, write, access == UC_MEM_FETCH)
                    if verdict is not None:
                        return self._refuse(entry, vaddr, verdict)
            entry.paddr = vaddr
            entry.perms = UC_PROT_ALL
            if write:
                self.ram.dirty.mark(vaddr >> 12)
            elif self.ram.dirty.enabled:
                entry.perms = UC_PROT_READ | UC_PROT_EXEC
            return True
        # Descriptor-table reads are supervisor accesses whatever the CPL; the
        # VMM's own reg_write calls are all of that kind (see cpu.write_cpu).
        user = not self.machine_call and (uc.reg_read(UC_X86_REG_SS) & 3) == 3
        cr3 = uc.reg_read(UC_X86_REG_CR3)
        try:
            page, writable = walk(self.ram, cr3, vaddr, write=write, user=user, wp=bool(cr0 & CR0_WP))
        except WalkFault as fault:
            return self._refuse(entry, vaddr, fault.error_code)
        prot = self.protection
        if prot is not None and self.machine_call and prot.active:
            # The VMM's own descriptor loads are "anyone else" too (never refused here).
            prot.touch_frame(page >> 12, "vmm descriptor load")
        elif prot is not None and prot.active:
            verdict = prot.on_fill(uc, vaddr, page, user, write, access == UC_MEM_FETCH, cr3)
            if verdict is not None:
                if verdict == "resume":     # not a fault: see Protection.on_fill
                    return False
                return self._refuse(entry, vaddr, verdict)
        entry.paddr = page
        perms = UC_PROT_READ | UC_PROT_EXEC
        if writable:
            if write:
                perms |= UC_PROT_WRITE
                self.ram.dirty.mark(page >> 12)
            elif not self.ram.dirty.enabled:
                perms |= UC_PROT_WRITE
        entry.perms = perms
        return True

    def _refuse(self, entry, vaddr: int, error_code: int) -> bool:
        if self.machine_call:
            # Never refuse here (see class doc): hand out physical page 0,
            # read-only, and let the machine report the bad access once
            # Unicorn returns.
            self.bad_machine_access = vaddr
            entry.paddr = 0
            entry.perms = UC_PROT_READ
            return True
        self.fault = (vaddr, error_code)
        return False

