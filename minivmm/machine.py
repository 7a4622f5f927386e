"""The machine: one guest CPU on Unicorn, its RAM, devices, and the run loop.

The run loop executes the guest in bounded slices (``emu_start`` with an
instruction count in deterministic mode, a host timeout in fast mode) and,
between slices, does what hardware would do asynchronously: deliver the
timer, inject faults, notice halts.  Hooks never deliver anything themselves:
they record what happened and stop the slice, because changing privilege
inside a hook needs ``reg_write`` of segment registers (see ``cpu.py``).
Exceptions raised inside a Unicorn callback are caught there and re-raised
from :meth:`Machine.step`, never left to unwind through QEMU.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable

from unicorn import (UC_ARCH_X86, UC_ERR_EXCEPTION, UC_HOOK_INSN, UC_HOOK_INSN_INVALID,
                     UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_32, UC_PROT_ALL, UC_TLB_VIRTUAL,
                     Uc, UcError)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_EAX, UC_X86_REG_EBX, \
    UC_X86_REG_ECX, UC_X86_REG_EDX, UC_X86_REG_EFLAGS, UC_X86_REG_EIP, UC_X86_REG_SS, \
    UC_X86_REG_CR3, UC_X86_REG_DR6

from minivmm import abi, events as ev, prot_pinned, regcache
from minivmm.console import Console
from minivmm.cpu import SEG_REGS, CpuState, read_cpu, write_cpu
from minivmm.errors import (GuestError, GuestHang, KernelPanic, KeysDestroyed, StateError, TripleFault, VmmError,
                            VmmInternalError)
from minivmm.image import GuestImage, ImageProcess
from minivmm.interrupts import DeliveryError, deliver, kernel_read
from minivmm.memory import GuestRAM
from minivmm.mmu import CR0_PG, Mmu, WalkFault, read_linear, walk
from minivmm.protection import Protection, seeded_keys
from minivmm.state import MachineState, VmmState
from minivmm.timer import Timer

regcache.install()          # ~30% off every VMM exit (see regcache.py)

EFLAGS_IF = 1 << 9
EFLAGS_RF = 1 << 16
EFLAGS_TF = 1 << 8
DR6_HITS = 0xF                      # B0-B3: which of DR0-DR3 matched
DETERMINISTIC, FAST = "deterministic", "fast"
MAX_SLICE = 1_000_000


@dataclass
class _Trap:
    """What a hook saw; handled by the run loop once emu_start returns."""
    vector: int
    software: bool
    error_code: int | None = None
    cr2: int | None = None


def _descriptor_access_bytes(ram: GuestRAM, cpu: CpuState) -> list[tuple[int, int]]:
    """(physical address, value) of the access byte (byte 5) of each GDT
    descriptor that ``cpu``'s segment selectors name (null and LDT selectors
    have none in the GDT; a table the walk cannot reach is write_cpu's error)."""
    out = []
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        sel = getattr(cpu, name)
        if sel & ~3 == 0 or sel & 4 or (sel & ~7) + 7 > cpu.gdt_limit:
            continue
        lin = (cpu.gdt_base + (sel & ~7) + 5) & 0xFFFFFFFF
        addr = lin
        if cpu.cr0 & CR0_PG:
            try:
                page, _ = walk(ram, cpu.cr3, lin, write=False, user=False, wp=False)
            except WalkFault:
                continue
            addr = page | (lin & 0xFFF)
        if addr < ram.size:
            out.append((addr, ram.view[addr]))
    return out


class Machine:
    """A bootable x86 machine running one guest image.

    ``mode`` is ``"deterministic"`` (instruction-count slices, reproducible)
    or ``"fast"`` (host-timeout slices).  ``tick_instructions`` is the timer
    period in guest instructions (deterministic mode); ``tick_us`` in host
    microseconds (fast mode).  ``protection=False`` turns process protection
    off (``HC_PROTECT`` then returns -ENOSYS): the teaching "unprotected" run.
    ``key_seed`` makes protection keys reproducible (tests, labs); without it
    they come from ``os.urandom``.
    """

    def __init__(self, image: GuestImage, *, ram_size: int = 16 << 20, mode: str = DETERMINISTIC,
                 tick_instructions: int = 100_000, tick_us: int = 2000, protection: bool = True,
                 key_seed: bytes | None = None, _boot: bool = True, _ram: GuestRAM | None = None):
        if mode not in (DETERMINISTIC, FAST):
            raise VmmError(f"mode must be {DETERMINISTIC!r} or {FAST!r}, not {mode!r}")
        # The VM's identity (random, made at boot) and migration generation (the
        # secure migration protocol spends one per migration).  Both travel in
        # its state (files and live migration): a destination refuses a
        # generation it has seen, so an old copy cannot be migrated again.
        self.migration_identity: tuple[str, int] = (os.urandom(16).hex(), 0)
        if _boot:
            image.validate()
        if image.min_ram > ram_size:
            raise VmmError(f"image {image.name!r} needs {image.min_ram >> 20} MiB+ of RAM, "
                           f"machine has {ram_size >> 20} MiB")
        self.image = image
        self.mode = mode
        self.tick_us = tick_us
        self.ram = GuestRAM(ram_size) if _ram is None else _ram
        self.mmu = Mmu(self.ram)
        self.timer = Timer(tick_instructions)
        self.console = Console()
        self.events = ev.EventBus()
        self.pids: dict[int, int] = {}          # cr3 -> pid, from HC_PROC_START
        self.names: dict[int, str] = {}
        self.exits: dict[int, int] = {}         # pid -> status
        self.halted: str | None = None          # why the machine stopped for good
        self.halt_detail = ""
        self.shutdown_status: int | None = None
        self.slices = 0
        # The last slice ended at hlt with interrupts on: the guest has nothing
        # to do until its next tick (the VMM jumps virtual time there).  Not
        # state: it says what the last slice did, for a caller pacing slices
        # (the migration source throttles an idle guest harder).
        self.idle = False
        self.debug_traps_hidden = 0             # breakpoint hits swallowed in protected processes
        self.trusted_output: list[tuple[int, int, str]] = []   # (pid, ident, text), HC_TRUSTED_WRITE
        self._trap: _Trap | None = None
        # Debugging (minivmm/debug_counter.py): an instruction-exact counter
        # whose hook may stop a slice part way, and how much of the current
        # slice already ran (0 at a slice boundary).
        self.counter = None
        self._slice_done = 0
        self._stop_reason: str | None = None
        self._hook_error: BaseException | None = None
        self.protection = Protection(self.ram, self.events, flush=self.flush_tlb,
                                     clock=lambda: self.timer.vclock, enabled=protection,
                                     key_source=seeded_keys(key_seed) if key_seed else os.urandom,
                                     before_event=self._flush_console,
                                     invalidate_code=self.flush_translations,
                                     stop_slice=self._stop_for_translations)
        self.mmu.protection = self.protection
        self.protection.reload_data_segments = self._reload_data_segments
        self._uc = self._make_uc()
        self._clean = self._uc.context_save()   # pristine: see interrupts.deliver
        if _boot:
            self._load(image)

    # ------------------------------------------------------------------ setup
    def _make_uc(self) -> Uc:
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, self.ram.size, UC_PROT_ALL, self.ram.host_address)
        uc._minivmm_ram = self.ram      # the buffer must outlive the engine mapping it
        uc.hook_add(UC_HOOK_TLB_FILL, self._guarded(self.mmu.fill, False))
        uc.hook_add(UC_HOOK_INTR, self._guarded(self._on_intr, None))
        uc.hook_add(UC_HOOK_INSN, self._guarded(self._on_out, None), aux1=UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._guarded(self._on_in, 0), aux1=UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._guarded(self._on_invalid, False))
        return uc

    def _guarded(self, fn, fallback):
        """Wrap a hook: a Python exception must never unwind through QEMU."""
        def hook(uc, *args):
            try:
                return fn(uc, *args)
            except BaseException as exc:        # noqa: BLE001 - re-raised by step()
                self._hook_error = exc
                self.mmu.machine_call = True    # the fill hook must not refuse now
                uc.emu_stop()
                return fallback
        return hook

    def _load(self, image: GuestImage) -> None:
        for paddr, data in image.segments:
            self.ram.write(paddr, data)
        # The loader's boot GDT: null, flat code (0x08), flat data (0x10),
        # like a multiboot loader hands over.
        gdt = struct.pack("<6I", 0, 0, 0x0000FFFF, 0x00CF9A00, 0x0000FFFF, 0x00CF9200)
        self.ram.write(abi.BOOT_GDT_PADDR, gdt)
        boot = CpuState(eip=image.entry, esp=image.boot_esp, eflags=0x2, cs=0x08, ss=0x10,
                        ds=0x10, es=0x10, fs=0x10, gs=0x10, cr0=0x11,
                        gdt_base=abi.BOOT_GDT_PADDR, gdt_limit=len(gdt) - 1, idt_limit=0)
        write_cpu(self._uc, self.mmu, boot)
        self.events.emit(ev.Boot, 0, image=image.name, ram_size=self.ram.size)

    # ------------------------------------------------------------------ hooks
    def _on_intr(self, uc, intno, user_data):
        if intno == abi.VEC_HYPERCALL:
            self._hypercall(uc)
            return
        if self.mmu.fault is not None:          # a refused fill, reported as #PF
            return
        if intno == abi.VEC_DB and self._debug_trap_in_protected(uc):
            return
        # Vectors the CPU raises itself have EIP at the faulting instruction;
        # int n / int3 / into leave it after the instruction.
        software = intno >= 32 or intno in (abi.VEC_BP, abi.VEC_OF)
        self._trap = _Trap(intno, software, 0 if intno in abi.ERROR_CODE_VECTORS else None)
        uc.emu_stop()

    def _debug_trap_in_protected(self, uc) -> bool:
        """A hardware breakpoint (DR0-DR3, armed by the kernel's DR7) hit by a
        protected process: Unicorn honours instruction breakpoints (data
        breakpoints it ignores), and neither writing DR7 nor restoring a
        context removes one the guest armed.  So the hit is swallowed: DR6's
        hit bits are cleared, and EFLAGS.RF lets the instruction run once;
        the kernel never learns the process got there.  (A process's own
        ``int1``/icebp is swallowed too.)"""
        if uc.reg_read(UC_X86_REG_SS) & 3 != 3:
            return False
        proc = self.protection.by_cr3.get(uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000)
        eflags = uc.reg_read(UC_X86_REG_EFLAGS)
        if proc is None or proc.exited or eflags & EFLAGS_TF:
            # Single-stepping: the process's own trap flag (a kernel that sets
            # it is caught at the return, as a changed eflags).
            return False
        # Not DR6 to tell a breakpoint: QEMU raises the trap for a breakpoint
        # it still holds even once DR7 (restored from a clean context) no
        # longer enables it, and then sets no B0-B3 bit.
        uc.reg_write(UC_X86_REG_DR6, uc.reg_read(UC_X86_REG_DR6) & ~DR6_HITS)
        uc.reg_write(UC_X86_REG_EFLAGS, eflags | EFLAGS_RF)
        self.debug_traps_hidden += 1
        self._stop_reason = "debug-trap-hidden"
        uc.emu_stop()
        return True

    def _stop_for_translations(self) -> None:
        """From a fill hook: end the slice after this block (see Protection)."""
        if self._stop_reason is None:
            self._stop_reason = "translations"
        self._uc.emu_stop()

    def _reload_data_segments(self, uc, selectors: dict[str, int]) -> None:
        """Load data segment registers from the guest's tables, from inside a
        hook: the descriptor reads are fills that must not be refused."""
        self.mmu.machine_call = True
        try:
            for name, sel in selectors.items():
                uc.reg_write(SEG_REGS[name], sel)
        finally:
            self.mmu.machine_call = False
        if self.mmu.bad_machine_access is not None:
            raise VmmInternalError(f"validated descriptor table unreadable at "
                                   f"{self.mmu.bad_machine_access:#x}")

    def _on_invalid(self, uc, user_data):
        self._trap = _Trap(abi.VEC_UD, False)
        uc.emu_stop()
        return True

    def _on_out(self, uc, port, size, value, user_data):
        if uc.reg_read(UC_X86_REG_SS) & 3:
            # Unicorn checks neither IOPL nor the I/O bitmap; the toy kernel
            # runs user mode at IOPL 0, so user port I/O is a #GP.
            self._trap = _Trap(abi.VEC_GP, False, 0)
            uc.emu_stop()
            return
        if port == abi.PORT_CONSOLE:
            self.console.put(value & 0xFF)
        elif port == abi.PORT_CONSOLE_CHANNEL:
            self.console.select(value & 0xFF)

    def _on_in(self, uc, port, size, user_data):
        if uc.reg_read(UC_X86_REG_SS) & 3:
            self._trap = _Trap(abi.VEC_GP, False, 0)
            uc.emu_stop()
        return 0xFFFFFFFF >> (32 - 8 * size)    # no device answers: all ones

    def _hypercall(self, uc) -> None:
        nr = uc.reg_read(UC_X86_REG_EAX)
        a = (uc.reg_read(UC_X86_REG_EBX), uc.reg_read(UC_X86_REG_ECX), uc.reg_read(UC_X86_REG_EDX))
        kernel = (uc.reg_read(UC_X86_REG_SS) & 3) == 0
        pid = self.pids.get(uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000, 0)
        self._flush_console()               # keep console and process events in order
        result = self._dispatch_hypercall(uc, nr, a, kernel)
        uc.reg_write(UC_X86_REG_EAX, result & 0xFFFFFFFF)
        self.events.emit(ev.Hypercall, self.timer.vclock, pid=0 if kernel else pid,
                         number=nr, args=a, result=result)

    def _dispatch_hypercall(self, uc, nr: int, a: tuple[int, int, int], kernel: bool) -> int:
        if nr == abi.HC_VERSION:
            return abi.ABI_VERSION
        if nr == abi.HC_PROTECT:
            if kernel:
                return -abi.EPERM
            cr3 = uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000
            pid = self.pids.get(cr3, 0)
            pinned = prot_pinned.snapshot(uc, self.ram, self._vmm_touch)
            return self.protection.protect(cr3, pid, self.names.get(pid, "?"), a[0], a[1], pinned)
        if nr == abi.HC_TRUSTED_WRITE:
            return -abi.EPERM if kernel else self._trusted_write(uc, a[0], a[1])
        if nr in (abi.HC_SHUTDOWN, abi.HC_PANIC, abi.HC_PROC_START, abi.HC_PROC_EXIT) and not kernel:
            return -abi.EPERM
        if nr == abi.HC_SHUTDOWN:
            self.shutdown_status = a[0]
            self._stop_reason = "shutdown"
            uc.emu_stop()
            return 0
        if nr == abi.HC_PANIC:
            self._stop_reason = "panic"
            self.halt_detail = f"vector {a[0]:#x} at eip {a[1]:#x}"
            uc.emu_stop()
            return 0
        if nr == abi.HC_PROC_START:
            name = self._kernel_string(a[2])
            self.pids[a[1] & 0xFFFFF000] = a[0]
            self.protection.process_started(a[0], a[1])
            self.names[a[0]] = name
            self.events.emit(ev.ProcessStart, self.timer.vclock, pid=a[0], name=name, cr3=a[1])
            return 0
        if nr == abi.HC_PROC_EXIT:
            self.exits[a[0]] = a[1]
            self.protection.process_exited(a[0])
            self.events.emit(ev.ProcessExit, self.timer.vclock, pid=a[0], status=a[1])
            return 0
        return -abi.ENOSYS

    def _trusted_write(self, uc, vaddr: int, length: int) -> int:
        """HC_TRUSTED_WRITE: a protected process's output, shown by the VMM
        with its identity (see Protection.trusted_read)."""
        cr3 = uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000
        data = self.protection.trusted_read(cr3, vaddr, length)
        if isinstance(data, int):
            return data
        proc = self.protection.by_cr3[cr3]
        text = data.decode("utf-8", "replace")
        self.trusted_output.append((proc.pid, proc.ident, text))
        self.events.emit(ev.TrustedOutput, self.timer.vclock, pid=proc.pid, name=proc.name,
                         ident=proc.ident, text=text)
        return length

    def _vmm_touch(self, frame: int) -> None:
        """The VMM itself is about to read or write ``frame`` (bypassing the TLB):
        to process protection it is "anyone else" (DESIGN §5)."""
        if self.protection.active:
            self.protection.touch_frame(frame, "vmm access")

    def _kernel_string(self, vaddr: int, limit: int = 16) -> str:
        try:
            raw = kernel_read(self.ram, read_cpu(self._uc), vaddr, limit, self._vmm_touch)
        except (DeliveryError, VmmError):
            return "?"
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    # --------------------------------------------------------------- run loop
    @property
    def vclock(self) -> int:
        """Virtual time: guest instructions (deterministic mode's clock)."""
        return self.timer.vclock

    @property
    def ticks(self) -> int:
        return self.timer.delivered

    def current_pid(self) -> int:
        if self._uc.reg_read(UC_X86_REG_SS) & 3 == 0:
            return 0
        return self.pids.get(self._uc.reg_read(UC_X86_REG_CR3) & 0xFFFFF000, 0)

    def step(self) -> str | None:
        """Run one slice and handle whatever ended it.

        Returns None, or (only with a debugger's ``counter`` installed)
        ``"break"``/``"limit"`` when the counter stopped the slice part way."""
        if self.halted:
            raise VmmError(f"machine has halted ({self.halted}); it cannot run")
        self.idle = False
        uc = self._uc
        if not self._slice_done:
            self.deliver_pending_timer()
        eip = uc.reg_read(UC_X86_REG_EIP)
        self._trap = None
        self._stop_reason = None
        self.mmu.fault = None
        self.protection.resume_pending = None
        budget = min(self.timer.budget(), MAX_SLICE)
        remaining = budget - self._slice_done
        counter = self.counter
        error: UcError | None = None
        try:
            if counter is not None:
                # Instruction-exact: the counter's code hook counts and stops
                # (a breakpoint, a single step, or the slice's end).
                counter.arm(remaining if self.mode == DETERMINISTIC else None)
                if self.mode == DETERMINISTIC:
                    uc.emu_start(eip, 0)
                else:
                    uc.emu_start(eip, 0, timeout=self.tick_us)
            elif self.mode == DETERMINISTIC:
                uc.emu_start(eip, 0, count=remaining)
            else:
                uc.emu_start(eip, 0, timeout=self.tick_us)
        except UcError as exc:
            error = exc
        finally:
            ran, why = counter.disarm() if counter is not None else (0, None)
        self.slices += 1
        self.protection.settle_translations()
        self._flush_console()
        if self._hook_error is not None:
            exc, self._hook_error = self._hook_error, None
            self.mmu.machine_call = False
            if isinstance(exc, KeysDestroyed):      # deliberate: the VM migrated away
                self._halt("keys-destroyed", str(exc))
                raise exc
            self._halt("vmm-error", f"{type(exc).__name__}: {exc}")
            raise VmmInternalError(f"VMM callback failed: {type(exc).__name__}: {exc}") from exc

        early = error is not None or self._trap is not None or self._stop_reason is not None
        if counter is not None and not early and why is not None and (
                self.mode == FAST or ran < remaining):
            # Stopped inside the slice by the debugger (see debug_counter.py):
            # virtual time stands still; the next step runs the rest of it.
            self._slice_done += ran
            return why
        self._slice_done = 0
        self.timer.advance(self.timer.exit_cost if early else budget)
        if self.mode == FAST and not early:
            self.timer.fire_now()           # the host timeout expired: a tick is due

        if error is not None:
            if error.errno == UC_ERR_EXCEPTION and self.protection.resume_pending is not None:
                # A protected process came back from the kernel to the wrong
                # place: load its whole saved context (see protection.py).
                proc, self.protection.resume_pending = self.protection.resume_pending, None
                st = self.protection.resume_context(proc, read_cpu(uc))
                uc.context_restore(self._clean)     # upstream #1883, as for faults
                write_cpu(uc, self.mmu, st)
                self.protection.restore_extended(uc, proc)
                return
            if error.errno == UC_ERR_EXCEPTION and self.mmu.fault is not None:
                cr2, code = self.mmu.fault
                self.mmu.fault = None
                self._fault(abi.VEC_PF, code, cr2)
                return
            self._halt("crash", f"emulation error at eip {uc.reg_read(UC_X86_REG_EIP):#x}: {error}")
            raise GuestError(f"guest crashed: emulation error at eip "
                             f"{uc.reg_read(UC_X86_REG_EIP):#x}: {error}")
        if self._stop_reason == "shutdown":
            self._halt("shutdown", f"status {self.shutdown_status}")
            return
        if self._stop_reason == "panic":
            self._halt("panic", self.halt_detail)
            raise KernelPanic(f"guest kernel panic: {self.halt_detail}")
        if self._trap is not None:
            trap = self._trap
            if trap.software:
                self._software_interrupt(trap.vector)
            else:
                self._fault(trap.vector, trap.error_code, None)
            return
        if early:
            return
        self._check_halt()

    @property
    def inside_slice(self) -> bool:
        """Stopped part way through a slice (by a debugger)."""
        return bool(self._slice_done)

    def finish_slice(self) -> None:
        """Run the rest of a slice a debugger stopped part way (before a save)."""
        while self._slice_done and not self.halted:
            self.step()

    def deliver_pending_timer(self) -> bool:
        """At a slice boundary: deliver a due timer tick if the guest takes
        interrupts (what ``step`` does first).  A debugger calls it right
        after a single step that ended a slice, so the step stops at the
        handler's first instruction; the guest sees the same either way."""
        if self._slice_done or not (self.timer.pending
                                    and self._uc.reg_read(UC_X86_REG_EFLAGS) & EFLAGS_IF):
            return False
        interrupted_cpl = self._last_cpl        # before delivery switches to ring 0
        self._deliver(abi.VEC_TIMER, None, software=False)
        self.timer.acknowledge()
        self.events.emit(ev.Interrupt, self.timer.vclock, vector=abi.VEC_TIMER,
                         cpl=interrupted_cpl)
        return True

    @property
    def _last_cpl(self) -> int:
        return self._uc.reg_read(UC_X86_REG_SS) & 3

    def _software_interrupt(self, vector: int) -> None:
        cpu = read_cpu(self._uc)
        if vector == abi.VEC_SYSCALL and cpu.cpl == 3:
            self.events.emit(ev.Syscall, self.timer.vclock, pid=self.pids.get(cpu.cr3 & 0xFFFFF000, 0),
                             number=cpu.eax, args=(cpu.ebx, cpu.ecx, cpu.edx))
        self._deliver(vector, None, software=True, cpu=cpu)

    def _fault(self, vector: int, error_code: int | None, cr2: int | None) -> None:
        cpu = read_cpu(self._uc)
        if cr2 is not None:
            cpu = cpu.replace(cr2=cr2)
        self.events.emit(ev.Fault, self.timer.vclock, pid=self.pids.get(cpu.cr3 & 0xFFFFF000, 0)
                         if cpu.cpl else 0, vector=vector, eip=cpu.eip,
                         error_code=error_code or 0, address=cr2 or 0)
        # A real exception: reset QEMU's exception state (upstream #1883).
        self._deliver(vector, error_code, software=False, cpu=cpu, clean=True)

    def _deliver(self, vector, error_code, *, software, cpu=None, clean=False) -> None:
        if self.protection.active:
            # A kernel entry from a protected process: the kernel gets scrubbed registers.
            cpu = self.protection.enter_kernel(cpu or read_cpu(self._uc), vector, software,
                                               uc=self._uc)
        try:
            deliver(self._uc, self.ram, self.mmu, vector, error_code=error_code, software=software,
                    cpu=cpu, clean_context=self._clean if clean else None, touch=self._vmm_touch)
        except TripleFault as exc:
            self._halt("triple-fault", str(exc))
            raise

    def _check_halt(self) -> None:
        """A slice that ran its whole budget, or stopped at hlt (CPL0)."""
        uc = self._uc
        eip = uc.reg_read(UC_X86_REG_EIP)
        if uc.reg_read(UC_X86_REG_SS) & 3 or not self._after_hlt(eip):
            return
        if uc.reg_read(UC_X86_REG_EFLAGS) & EFLAGS_IF:
            self.timer.skip_to_next_tick()      # idle: nothing happens until the tick
            self.idle = True
            return
        # hlt with IF=0 never wakes up.  Unicorn cannot tell us it halted, so
        # confirm: a halted loop comes straight back to the same hlt.
        for _ in range(3):
            self.timer.advance(self.timer.exit_cost)
            try:
                uc.emu_start(eip, 0, count=4)
            except UcError:
                self.protection.settle_translations()
                # It did not stay halted: whatever stopped the probe (a fault, a
                # refused fill) happens again, and is handled, in the next step.
                self._trap = None
                return
            self.protection.settle_translations()
            if self._trap is not None or self._stop_reason is not None:
                self._trap = self._stop_reason = None   # the same: the next step redoes it
                return
            if uc.reg_read(UC_X86_REG_EIP) != eip:
                return
        self._halt("hang", f"hlt with interrupts disabled at eip {eip - 1:#x}")
        raise GuestHang(f"guest hangs: hlt with interrupts disabled at eip {eip - 1:#x}")

    def _after_hlt(self, eip: int) -> bool:
        try:
            cpu = read_cpu(self._uc)
            return kernel_read(self.ram, cpu, eip - 1, 1, self._vmm_touch) == b"\xf4"
        except (DeliveryError, VmmError):
            return False

    def _halt(self, reason: str, detail: str) -> None:
        self.halted = reason
        self.halt_detail = detail
        self.events.emit(ev.Halted, self.timer.vclock, reason=reason, detail=detail)

    def _flush_console(self) -> None:
        for pid, data in self.console.take_unflushed():
            self.events.emit(ev.ConsoleOutput, self.timer.vclock, pid=pid,
                             text=data.decode("utf-8", "replace"))

    # ------------------------------------------------------------ run helpers
    def run(self, *, until: Callable[["Machine"], bool] | None = None,
            max_ticks: int | None = None, max_instructions: int | None = None) -> str:
        """Run until the guest shuts down, ``until(machine)`` is true, or a bound.

        Returns ``"shutdown"``, ``"condition"``, ``"ticks"`` or
        ``"instructions"``; raises :class:`GuestError` if the guest crashes.
        """
        tick0, clock0 = self.timer.delivered, self.timer.vclock
        while True:
            if self.halted == "shutdown":
                return "shutdown"
            if until is not None and until(self):
                return "condition"
            if max_ticks is not None and self.timer.delivered - tick0 >= max_ticks:
                return "ticks"
            if max_instructions is not None and self.timer.vclock - clock0 >= max_instructions:
                return "instructions"
            self.step()

    def run_until_console(self, text: str, *, pid: int | None = None, max_ticks: int = 100_000) -> str:
        return self.run(until=lambda m: text in m.console.text(pid), max_ticks=max_ticks)

    def run_until_exit(self, pid: int, *, max_ticks: int = 100_000) -> str:
        return self.run(until=lambda m: pid in m.exits, max_ticks=max_ticks)

    # ------------------------------------------------------------ inspection
    def cpu(self) -> CpuState:
        return read_cpu(self._uc)

    def read_virtual(self, cr3: int, vaddr: int, length: int, *, user: bool = True) -> bytes:
        """Read guest memory through address space ``cr3`` (as CPL3 if ``user``)."""
        try:
            return read_linear(self.ram, cr3, vaddr, length, user=user, touch=self._vmm_touch)
        except WalkFault:
            raise VmmError(f"virtual address range at {vaddr:#x} is not mapped in address space {cr3:#x}") from None

    def write_registers(self, changes: dict[str, int]) -> None:
        """Set general registers, eip, eflags or segment selectors (a
        debugger's write).  General registers are written alone; a changed
        selector reloads the whole state (its descriptor comes from the
        guest's GDT, at the CPL the new SS gives; see cpu.write_cpu)."""
        from minivmm.cpu import GP_REGS
        cpu = read_cpu(self._uc)
        unknown = set(changes) - set(GP_REGS) - set(SEG_REGS) - {"eip", "eflags"}
        if unknown:
            raise VmmError(f"cannot write register(s) {', '.join(sorted(unknown))}")
        changes = {k: v & 0xFFFFFFFF for k, v in changes.items() if getattr(cpu, k) != v & 0xFFFFFFFF}
        if any(k in SEG_REGS for k in changes):
            try:
                write_cpu(self._uc, self.mmu, cpu.replace(**changes))
            except UcError as exc:
                write_cpu(self._uc, self.mmu, cpu)
                raise VmmError(f"the CPU refused the selectors: {exc}") from None
            if self.mmu.bad_machine_access is not None:
                self.mmu.bad_machine_access = None
                write_cpu(self._uc, self.mmu, cpu)
                raise VmmError("a selector's descriptor is not mapped")
            return
        for name, value in changes.items():
            reg = GP_REGS.get(name) or {"eip": UC_X86_REG_EIP, "eflags": UC_X86_REG_EFLAGS}[name]
            self._uc.reg_write(reg, value)

    def read_guest(self, vaddr: int, length: int) -> bytes:
        """Read ``length`` bytes at ``vaddr`` as the CPU sees them now at CPL0
        (through the current CR3, or physical with paging off): a debugger's
        view.  The VMM is "anyone else" to process protection, so a protected
        page reads as ciphertext (it is cloaked first, as for every VMM read)."""
        try:
            return kernel_read(self.ram, read_cpu(self._uc), vaddr, length, self._vmm_touch)
        except DeliveryError as exc:
            raise VmmError(str(exc)) from None

    def write_guest(self, vaddr: int, data: bytes) -> None:
        """Write guest memory at ``vaddr`` through the current page tables,
        whatever the pages' R/W bits say (a debugger's write, not the guest's).
        A protected page is cloaked first, so the write lands in ciphertext and
        its owner sees an integrity violation, as after any other tampering.
        Translated code is dropped: the bytes may be code (DESIGN §8)."""
        cpu = read_cpu(self._uc)
        frames = []
        off = 0
        while off < len(data):
            va = (vaddr + off) & 0xFFFFFFFF
            chunk = min(len(data) - off, 0x1000 - (va & 0xFFF))
            if cpu.cr0 & (1 << 31):
                try:
                    page, _ = walk(self.ram, cpu.cr3, va, write=False, user=False)
                except WalkFault:
                    raise VmmError(f"linear address {va:#x} is not mapped") from None
            else:
                page = va & 0xFFFFF000
                if page + 0x1000 > self.ram.size:
                    raise VmmError(f"physical address {va:#x} is outside RAM (paging off)")
            frames.append((page | (va & 0xFFF), data[off:off + chunk]))
            off += chunk
        for paddr, chunk in frames:         # every page checked before any write
            self._vmm_touch(paddr >> 12)
            self.ram.write(paddr, chunk)
        self.flush_translations()

    def flush_tlb(self) -> None:
        self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def flush_translations(self) -> None:
        """Drop all translated code (safe inside hooks).  Neither uc.mem_write
        nor a write through the RAM buffer does it (DESIGN §8); by virtual
        range (ctl_remove_cache) would miss the other addresses a frame is
        mapped at, so it is all of them."""
        self._uc.ctl_flush_tb()

    # ------------------------------------------------------------ save/restore
    def save_state(self, *, ram: bool = True) -> MachineState:
        """Everything needed to continue this machine elsewhere (between slices).

        ``ram=False`` leaves ``MachineState.ram`` empty (no 256 MiB copy): for a
        caller that moves guest RAM itself, as live migration does."""
        if self._slice_done:
            raise VmmError("the machine is stopped inside a slice (by a debugger): "
                           "finish the slice before saving its state")
        img = self.image
        return MachineState(
            ram_size=self.ram.size, ram=bytes(self.ram.view) if ram else b"", cpu=read_cpu(self._uc),
            timer=self.timer.save(), console=self.console.save(), dirty=self.ram.dirty.save(),
            vmm=VmmState(mode=self.mode, tick_us=self.tick_us, pids=dict(self.pids),
                         names=dict(self.names), exits=dict(self.exits), event_seq=self.events.seq,
                         slices=self.slices, halted=self.halted, halt_detail=self.halt_detail,
                         shutdown_status=self.shutdown_status),
            identity={"vm_id": self.migration_identity[0], "generation": self.migration_identity[1]},
            image={"name": img.name, "description": img.description, "min_ram": img.min_ram,
                   "entry": img.entry, "boot_esp": img.boot_esp,
                   "kernel_symbols": dict(img.kernel_symbols),
                   "processes": [{"pid": p.pid, "name": p.name, "cr3": p.cr3, "entry": p.entry,
                                  "data_pages": p.data_pages, "args": list(p.args),
                                  "symbols": dict(p.symbols)} for p in img.processes]},
            protection=self.protection.save())

    @classmethod
    def restore(cls, st: MachineState, *, ram: GuestRAM | None = None) -> "Machine":
        """A fresh machine (new Unicorn instance) that continues exactly where ``st`` was.

        ``ram``: adopt this already-filled guest RAM instead of copying
        ``st.ram`` (live migration receives pages straight into it)."""
        if ram is not None and ram.size != st.ram_size:
            raise StateError(f"state: RAM of {ram.size} bytes given for a {st.ram_size}-byte machine")
        if ram is None and len(st.ram) != st.ram_size:
            raise StateError(f"state: holds {len(st.ram)} bytes of RAM, not {st.ram_size}")
        meta = st.image
        try:
            image = GuestImage(
                name=str(meta["name"]), entry=int(meta["entry"]), boot_esp=int(meta["boot_esp"]),
                min_ram=int(meta["min_ram"]), segments=[], description=str(meta.get("description", "")),
                kernel_symbols={str(k): int(v) for k, v in meta["kernel_symbols"].items()},
                processes=[ImageProcess(pid=int(p["pid"]), name=str(p["name"]), cr3=int(p["cr3"]),
                                        entry=int(p["entry"]), data_pages=int(p["data_pages"]),
                                        args=tuple(int(a) for a in p["args"]),
                                        symbols={str(k): int(v) for k, v in p["symbols"].items()})
                           for p in meta["processes"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state: bad image metadata: {exc}") from None
        if st.vmm.mode not in (DETERMINISTIC, FAST):
            raise StateError(f"state: unknown run mode {st.vmm.mode!r}")
        try:
            timer = Timer.restore(st.timer)
        except ValueError as exc:
            raise StateError(f"state: timer: {exc}") from None
        m = cls(image, ram_size=st.ram_size, mode=st.vmm.mode, tick_instructions=timer.period,
                tick_us=st.vmm.tick_us,
                protection=st.protection.enabled if st.protection else True, _boot=False, _ram=ram)
        if ram is None:
            m.ram.view[:] = st.ram
        m.timer = timer
        m.console = Console.restore(st.console)
        try:
            m.ram.dirty.restore(st.dirty)
        except ValueError as exc:
            raise StateError(f"state: dirty log: {exc}") from None
        if st.protection is not None:
            try:
                m.protection.restore(st.protection)
            except (ValueError, KeyError, TypeError) as exc:
                raise StateError(f"state: protection metadata: {exc}") from None
        if st.identity is not None:
            m.migration_identity = (st.identity["vm_id"], st.identity["generation"])
        v = st.vmm
        m.pids, m.names, m.exits = dict(v.pids), dict(v.names), dict(v.exits)
        m.events.seq, m.slices = v.event_seq, v.slices
        m.halted, m.halt_detail, m.shutdown_status = v.halted, v.halt_detail, v.shutdown_status
        # Loading a selector sets the accessed bit of its GDT descriptor in guest
        # memory, which the guest's own loads (an iret into user mode) had not
        # always done: put those bytes back, so that a restored guest (a migrated
        # one) sees exactly the memory it was saved with.
        access = _descriptor_access_bytes(m.ram, st.cpu)
        write_cpu(m._uc, m.mmu, st.cpu)
        if m.mmu.bad_machine_access is not None:
            raise StateError(f"state: CPU descriptor tables point at unmapped {m.mmu.bad_machine_access:#x}")
        for addr, value in access:
            m.ram.view[addr] = value
        return m

    def save(self, path, *, wrap=None) -> None:
        """Write the state to ``path``, readable and writable by the owner only
        (0600): it holds real registers and plaintext.  The file is created
        0600 (no moment with wider permissions), and an existing file is
        narrowed to 0600 before anything is written to it.  Process keys are
        never written in clear: a machine that holds any needs ``wrap``
        (a ``minivmm.state.KeyWrap``; the migrate package's seals them to the
        host's TPM), else ``StateError`` and nothing is written.  Without
        process keys the file is written as is (``wrap`` unused)."""
        st = self.save_state()
        if wrap is None and st.has_keys():
            raise StateError(f"{path}: this machine holds the keys of protected processes, which are never "
                             f"written to a file in clear: save it through a VMM that seals them to its TPM "
                             f"('minivmm run ... --save-state', with the migrate package installed)")
        data = st.to_bytes(wrap=wrap if st.has_keys() else None)     # nothing to seal: no TPM needed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                fd = -1                 # the file object owns it now
                f.write(data)
        finally:
            if fd >= 0:
                os.close(fd)

    @classmethod
    def load(cls, path, *, unwrap=None) -> "Machine":
        """``unwrap``: the ``KeyWrap`` that opens sealed process keys (if the file has any)."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.restore(MachineState.from_bytes(data, str(path), unwrap=unwrap))

    # ------------------------------------------------------------------ export
    def seal_for_export(self) -> int:
        """Call between slices, before the VMM reads guest RAM to send it away
        (migration): every protected page still in plaintext is cloaked first,
        so no plaintext of a protected process leaves through the VMM's own
        reads (DESIGN §5).  Pages it rewrites are marked dirty.  Returns how
        many pages it cloaked."""
        return self.protection.seal_all()

    def protected_frames(self) -> list[int]:
        """Frames that hold protected pages.  Right after :meth:`seal_for_export`
        they are all ciphertext; but once the guest runs again their owners may
        decrypt them in place at any instruction, so a reader on another thread
        (migration's sender) must take its copy of these between slices."""
        return sorted(self.protection.frames)

    def is_protected_frame(self, frame: int) -> bool:
        """Whether ``frame`` holds a protected page now.  Safe from another
        thread (one dict lookup): migration's sender checks each frame *after*
        copying it, and sends zeros instead of the copy of a frame that became
        protected since the round's :meth:`protected_frames` snapshot (it is
        logged dirty and goes again, sealed)."""
        return frame in self.protection.frames

    # ----------------------------------------------------------- dirty logging
    def dirty_log_start(self) -> None:
        self.ram.dirty.start()
        self.flush_tlb()

    def dirty_log_stop(self) -> None:
        self.ram.dirty.stop()
        self.flush_tlb()

    def dirty_log_fetch(self):
        """Frames written since the last fetch (or start); clears and re-arms."""
        pfns = self.ram.dirty.fetch_and_clear()
        self.flush_tlb()
        return pfns

    # ------------------------------------------------------- guest-visible view
    def processes(self):
        """The guest kernel's process table (see ``minivmm.guestview``)."""
        from minivmm.guestview import process_table
        return process_table(self)

    def read_process(self, pid: int, vaddr: int, length: int) -> bytes:
        """Read ``length`` bytes at ``vaddr`` as process ``pid`` sees them."""
        for proc in self.processes():
            if proc.pid == pid:
                return self.read_virtual(proc.cr3, vaddr, length)
        raise VmmError(f"no process with pid {pid}")
