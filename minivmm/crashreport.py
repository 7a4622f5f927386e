"""Crash reports: what ``minivmm run`` prints when the guest crashes.

A kernel panic, a triple fault, a hang, or a process the kernel killed for
a fault: instead of one line, the report gives the fault (vector, EIP, error
code, CR2), the registers when it happened, the disassembly around EIP, and
the last few VMM events (in the ``--events`` text form).

:class:`Recorder` subscribes to the machine's events.  At each ``Fault``
it keeps a snapshot of the registers, because by the time a process is
reported killed, or the kernel panics, the CPU has long moved on to the
handler.  The code around EIP is read when a report is made, through the
fault's page tables and without touching the guest (``guestpeek``: a
protected page is not read).  Reading registers in a subscriber is safe: it is
only ``reg_read``; nothing is written back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minivmm import abi, eventformat
from minivmm import events as ev
from minivmm.guestpeek import disasm_around

RECENT = 8


@dataclass
class Snapshot:
    fault: ev.Fault
    cpu: object                 # CpuState at the fault

    def code(self, machine) -> list[str]:
        """Disassembled when reported, through the page tables of the fault
        (a guest with many faults -- the controlled-channel lab -- pays
        nothing for faults that are never reported)."""
        return disasm_around(machine, self.cpu, self.fault.eip)


def fault_line(f: ev.Fault) -> str:
    name = eventformat.VECTORS.get(f.vector, "vector")
    line = f"{name}({f.vector}) at eip {f.eip:#010x}, error code {f.error_code:#x}"
    if f.vector == abi.VEC_PF:
        line += f", cr2 {f.address:#010x} (page-aligned: see docs/guest-abi.md)"
    return line


def register_lines(cpu) -> list[str]:
    g = ("eax", "ebx", "ecx", "edx"), ("esi", "edi", "ebp", "esp")
    lines = ["  ".join(f"{n}={getattr(cpu, n):#010x}" for n in row) for row in g]
    lines.append(f"eip={cpu.eip:#010x}  eflags={cpu.eflags:#010x}  cpl={cpu.cpl}")
    lines.append("  ".join(f"{n}={getattr(cpu, n):#06x}" for n in ("cs", "ss", "ds", "es", "fs", "gs")))
    lines.append("  ".join(f"{n}={getattr(cpu, n):#010x}" for n in ("cr0", "cr2", "cr3", "cr4")))
    return lines


class Recorder:
    """Keeps what a crash report needs; ``on_killed(lines)`` is called when
    the kernel reports a process exit with status 128 + vector after a fault."""

    def __init__(self, machine, on_killed=None):
        self.machine = machine
        self.recent: deque[ev.Event] = deque(maxlen=RECENT)
        self.faults: dict[int, Snapshot] = {}
        self.last_fault: Snapshot | None = None
        self.on_killed = on_killed
        machine.events.subscribe(self)

    def __call__(self, e: ev.Event) -> None:
        if not isinstance(e, ev.ConsoleOutput):
            self.recent.append(e)
        if isinstance(e, ev.Fault):
            cpu = self.machine.cpu()
            if e.vector == abi.VEC_PF:
                cpu = cpu.replace(cr2=e.address)    # the VMM loads CR2 as it delivers the #PF
            snap = Snapshot(e, cpu)
            self.faults[e.pid] = self.last_fault = snap
        elif isinstance(e, ev.ProcessExit) and e.status >= 128 and self.on_killed is not None:
            snap = self.faults.pop(e.pid, None)
            if snap is not None and e.status == 128 + snap.fault.vector:
                name = self.machine.names.get(e.pid, "?")
                self.on_killed(self.report(f"pid {e.pid} ({name}) was killed by the kernel "
                                           f"(exit status {e.status})", snap))

    def report(self, headline: str, snap: Snapshot | None) -> list[str]:
        lines = [f"crash report: {headline}"]
        if snap is not None:
            lines.append(f"  fault: {fault_line(snap.fault)}")
            lines.append("  registers at the fault:")
            cpu, code = snap.cpu, snap.code(self.machine)
        else:
            lines.append("  registers now:")
            cpu = self.machine.cpu()
            code = disasm_around(self.machine, cpu, cpu.eip)
        lines += [f"    {line}" for line in register_lines(cpu)]
        lines.append("  code:")
        lines += [f"    {line}" for line in code]
        lines.append(f"  last {len(self.recent)} events:")
        lines += [f"    {eventformat.to_text(e)}" for e in self.recent]
        return lines

    def machine_crash(self, error) -> list[str]:
        """The report for a crash of the whole guest (``GuestError``)."""
        m = self.machine
        snap = self.last_fault
        if m.halted == "panic":
            snap = self.faults.get(0)           # the kernel's own fault, if it had one
        if m.halted == "hang":
            snap = None                         # the state now *is* the crash
        headline = f"{m.halted or 'crash'}: {error}"
        if snap is not None and m.halted == "triple-fault" and snap.fault.vtime != m.vclock:
            snap = None                         # a delivery that was not a fault's (timer, int n)
        return self.report(headline, snap)
