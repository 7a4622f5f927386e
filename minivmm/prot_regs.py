"""Register protection: what the kernel sees of a protected process at a
kernel entry, and what the process gets back (a mixin of ``Protection``).

On every kernel entry from a protected process the VMM saves its registers
and shows the kernel scrubbed ones: zero in every general register except
the system-call number and arguments (eax, ebx, ecx, edx) on ``int 0x80``,
and the arithmetic flags cleared.  The return is found without any guest
cooperation (DESIGN §5): the entry flushes the TLB, so the first ring-3
instruction fetch under the process's CR3 afterwards is a fill.  There the
VMM compares what the kernel hands back with what it showed it (only eax,
the system-call result, may change), reports any difference as tampering,
checks the descriptors and CR0 bits pinned at HC_PROTECT (``prot_pinned``;
a difference stops the process), and restores the saved registers: inside
the hook, reloading the data segments from the checked tables, or -- when
the kernel changed eip, esp, eflags or a selector (the translation already
under way is for the wrong place) -- by refusing the fill so that the
machine restores the whole context between slices (``resume_context``).
"""

from __future__ import annotations

from unicorn.x86_const import UC_X86_REG_EFLAGS, UC_X86_REG_EIP

from minivmm import abi, prot_fpu, prot_pinned
from minivmm import events as ev
from minivmm.cpu import GP_REGS, SEG_REGS, CpuState
from minivmm.prot_state import ProtectedProcess

GP = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
SYSCALL_VISIBLE = ("eax", "ebx", "ecx", "edx")
CONTROL = ("eip", "esp", "eflags", "cs", "ss", "ds", "es", "fs", "gs")
EFLAGS_STATUS = 0x8D5           # CF PF AF ZF SF OF: scrubbed at kernel entry, restored on return


class RegisterProtection:
    """Mixed into ``Protection``: uses its ``by_cr3``, ``ram``, ``_flush``,
    ``_emit``, ``_violation``, ``touch_frame``, ``resume_pending`` and
    ``reload_data_segments``."""

    def enter_kernel(self, cpu: CpuState, vector: int, software: bool, uc=None) -> CpuState:
        """A kernel entry from ring 3: returns the state the kernel may see.
        With ``uc``, its x87/SSE registers are saved and reset too (prot_fpu)."""
        proc = self.by_cr3.get(cpu.cr3 & 0xFFFFF000)
        if proc is None or cpu.cpl != 3:
            return cpu
        settling = proc.in_kernel
        if settling:
            # The kernel returned to it, but a slice ended between that iret and
            # its first fetch, and now an interrupt comes first: settle the
            # return here, or the scrubbed registers would be saved as real ones.
            self._check_return(proc, cpu.to_dict())
            cpu = self.resume_context(proc, cpu)
        syscall = software and vector == abi.VEC_SYSCALL
        keep = SYSCALL_VISIBLE if syscall else ()
        # Every general register but the system-call arguments, and the
        # arithmetic flags (a compare on a secret leaves its result there).
        shown = cpu.replace(eflags=cpu.eflags & ~EFLAGS_STATUS,
                            **{r: 0 for r in GP if r not in keep})
        if uc is not None and not settling:
            # (settling: it never ran since the last entry, whose save stands)
            proc.fpu = prot_fpu.save(uc)
            if proc.fpu is not None:
                prot_fpu.scrub(uc)
        proc.saved, proc.shown, proc.syscall, proc.in_kernel = cpu, shown, syscall, True
        self._flush()       # its return will then start with a ring-3 fill (see module doc)
        return shown

    def _check_return(self, proc: ProtectedProcess, current: dict[str, int]) -> list[str]:
        """Compare what the kernel hands back with what it was shown; report
        any difference (only eax after a system call may change)."""
        shown = proc.shown
        diffs = [name for name in GP + CONTROL
                 if not (name == "eax" and proc.syscall) and current[name] != getattr(shown, name)]
        if diffs:
            detail = ", ".join(f"{n} {getattr(shown, n):#x} -> {current[n]:#x}" for n in diffs)
            self._emit(ev.RegisterTamper, pid=proc.pid, name=proc.name, registers=tuple(diffs),
                       detail=detail)
        return diffs

    def _returned(self, uc, proc: ProtectedProcess, vaddr: int):
        """The first ring-3 fetch of ``proc`` after a kernel entry.  Report any
        register the kernel changed; stop the process if the descriptors or
        CR0 bits behind its addresses differ from those pinned at HC_PROTECT;
        otherwise restore its registers: here, or (when the kernel changed
        eip, esp, eflags or a selector: the translation under way is for the
        wrong place) by refusing the fill with ``"resume"``, so that between
        slices the machine loads the saved context (``resume_context``).
        Either way every data segment is reloaded from the validated tables."""
        current = {n: uc.reg_read(r) for n, r in GP_REGS.items()}
        current.update({n: uc.reg_read(r) for n, r in SEG_REGS.items()})
        current["eip"] = uc.reg_read(UC_X86_REG_EIP)
        current["eflags"] = uc.reg_read(UC_X86_REG_EFLAGS)
        redirected = any(d in CONTROL for d in self._check_return(proc, current))
        if proc.pinned is not None:
            diffs = prot_pinned.differences(
                proc.pinned, prot_pinned.snapshot(uc, self.ram, lambda f: self.touch_frame(
                    f, "vmm descriptor check"), current, proc.cr3))
            if diffs:
                proc.in_kernel = False
                return self._violation(proc, vaddr, False,
                                       "descriptors changed behind its selectors: " + "; ".join(diffs))
        if redirected or self.reload_data_segments is None:
            self.resume_pending = proc
            return "resume"
        # The kernel came back to the right place (iretd has just loaded CS
        # and SS from the tables validated above): restore the registers and
        # flags here, and reload DS/ES/FS/GS, whose caches the kernel may have
        # loaded from a table it then changed back.  (Cheaper than the
        # between-slices path, which reloads everything.)
        saved = proc.saved
        # (A null selector is not reloaded: a correct program cannot address through one.)
        self.reload_data_segments(uc, {n: getattr(saved, n) for n in ("ds", "es", "fs", "gs")
                                       if getattr(saved, n) & ~3})
        for name in GP:
            if not (name == "eax" and proc.syscall):
                uc.reg_write(GP_REGS[name], getattr(saved, name))
        uc.reg_write(UC_X86_REG_EFLAGS, saved.eflags)
        self.restore_extended(uc, proc)
        proc.in_kernel = False
        return None

    def restore_extended(self, uc, proc: ProtectedProcess) -> None:
        """Load its x87/SSE registers back, if it had any to hide."""
        if proc.fpu is not None:
            prot_fpu.load(uc, proc.fpu)
            proc.fpu = None

    def resume_context(self, proc: ProtectedProcess, current: CpuState) -> CpuState:
        """The context to load when the kernel returned to the wrong place (or
        when the return is settled outside the hook): its saved registers,
        with the system-call result.  Already checked by ``_check_return``."""
        saved = proc.saved
        restore = {n: getattr(saved, n) for n in GP + CONTROL}
        if proc.syscall:
            restore["eax"] = current.eax
        proc.in_kernel = False
        return current.replace(**restore)
