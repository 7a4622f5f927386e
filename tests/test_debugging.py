"""Debugging the guest: the GDB stub (from Python and from a real gdb), the
instruction counter that keeps deterministic runs unchanged, traces, crash
reports, and ``minivmm asm``."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdbclient import Client
from guests.build import KERNEL_DIR, Program, build_image
from guests.catalog import GUESTS
from minivmm import abi, gdb_regs, gdb_stub
from minivmm.debug_counter import InstructionCounter
from minivmm.errors import VmmError
from minivmm.machine import Machine

P = Program.builtin


def cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


# ------------------------------------------------------------ determinism
def small_counter():
    # Two counters and a tick every 1000 instructions: many ticks, preemption
    # in user and kernel code, in a few tens of thousands of instructions.
    return build_image([P("counter", args=(6, 3000), as_name="ca"),
                        P("counter", args=(6, 3000), as_name="cb")])


def finish(m):
    while m.halted != "shutdown":
        m.step()


def test_breakpoints_and_steps_do_not_change_what_the_guest_computes():
    image = small_counter()
    plain = Machine(image, tick_instructions=1000)
    finish(plain)
    m = Machine(image, tick_instructions=1000)
    c = InstructionCounter()
    c.install(m)
    syms = image.kernel_symbols
    c.breakpoints = {syms["vec_syscall"], syms["timer_tick"], image.processes[1].entry}
    hits = steps = 0
    while m.halted != "shutdown":
        if m.step() == "break":
            hits += 1
            c.skip_once = m.cpu().eip
            for _ in range(3):                    # a few single steps at every hit
                c.step_limit = 1
                while c.step_limit and not m.halted:
                    m.step()
                c.step_limit = None
                m.deliver_pending_timer()
                steps += 1
    assert hits > 20 and plain.ticks > 20
    assert m.console.text() == plain.console.text() and m.exits == plain.exits
    assert (m.vclock, m.ticks, m.cpu()) == (plain.vclock, plain.ticks, plain.cpu())
    assert bytes(m.ram.view) == bytes(plain.ram.view)


def test_a_machine_stopped_inside_a_slice_refuses_to_save():
    m = Machine(GUESTS["hello"].build())
    c = InstructionCounter()
    c.install(m)
    c.step_limit = 1
    m.step()
    with pytest.raises(VmmError, match="inside a slice"):
        m.save_state()


# ------------------------------------------------------ protocol, in Python
class Stub:
    """The stub serving ``machine`` on a free port, in a thread."""

    def __init__(self, machine):
        self.machine = machine
        self.port = None
        self.ready = threading.Event()
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(60)
        self.client = Client("127.0.0.1", self.port)

    def _announce(self, host, port):
        self.port = port
        self.ready.set()

    def _run(self):
        try:
            self.result = gdb_stub.serve(self.machine, "127.0.0.1:0", announce=self._announce)
        except gdb_stub.GuestEnded as end:
            self.result = end
        except Exception as exc:        # noqa: BLE001 - reported by the test
            self.result = exc

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.result


def regs(client):
    raw = bytes.fromhex(client.ask("g")[:16 * 8])
    return dict(zip(gdb_regs.GENERAL + gdb_regs.SEGMENTS, struct.unpack("<16I", raw)))


SESSION = gdb_stub.Session(Machine(GUESTS["hello"].build()), socket.socketpair()[0])


def test_protocol_registers_breakpoint_step_memory_and_exit():
    image = GUESTS["hello"].build()
    stub = Stub(Machine(image))
    c = stub.client
    assert "qXfer:features:read+" in c.ask("qSupported:multiprocess+;swbreak+")
    assert c.ask("?") == "S05" and c.ask("qAttached") == "1"
    assert regs(c)["eip"] == image.entry and regs(c)["cs"] == 0x08
    xml = c.ask("qXfer:features:read:target.xml:0,fff")
    assert xml.startswith("l") and "org.gnu.gdb.i386.core" in xml and 'name="cr3"' in xml
    syscall = image.kernel_symbols["syscall"]
    assert c.ask(f"Z0,{syscall:x},1") == "OK"
    assert c.ask("c") == "S05"
    r = regs(c)
    assert r["eip"] == syscall and r["eax"] == abi.VEC_SYSCALL and r["cs"] == abi.SEL_KCODE
    cr3 = int.from_bytes(bytes.fromhex(c.ask(f"p{gdb_regs.NUMBER['cr3']:x}")), "little")
    assert cr3 == image.processes[0].cr3
    assert c.ask(f"P{gdb_regs.NUMBER['cr3']:x}=00000000") == "E01"          # read-only
    assert c.ask(f"p{gdb_regs.NUMBER['st0']:x}") == "xx" * 10                 # unavailable
    # memory by virtual address, through the process's page tables: its message
    msg = image.processes[0].symbols["msg"]
    assert bytes.fromhex(c.ask(f"m{msg:x},c")) == b"hello, world"
    assert c.ask("m60000000,4") == "E0e"                                       # unmapped
    assert c.ask("s") == "S05" and regs(c)["eip"] != syscall                   # one instruction
    assert c.ask(f"z0,{syscall:x},1") == "OK"
    # registers written from GDB reach the guest: exit status 7 instead of 0
    user_exit = image.processes[0].entry + 0x11        # mov eax, SYS_EXIT; xor ebx, ebx; int 0x80
    assert c.ask(f"Z0,{user_exit + 7:x},1") == "OK" and c.ask("c") == "S05"
    assert regs(c)["eip"] == user_exit + 7
    assert c.ask(f"P{gdb_regs.NUMBER['ebx']:x}=07000000") == "OK"
    c.sock.sendall(b"$c#63")
    assert c.ack() == b"+" and c.packet() == "W00"     # the kernel's shutdown status
    end = stub.join()
    assert isinstance(end, gdb_stub.GuestEnded) and end.error is None
    assert stub.machine.exits == {1: 7}


def test_a_gdb_session_with_breakpoints_and_steps_leaves_the_guest_unchanged():
    image = small_counter()
    plain = Machine(image, tick_instructions=1000)
    finish(plain)
    m = Machine(image, tick_instructions=1000)
    stub = Stub(m)
    c = stub.client
    syms = image.kernel_symbols
    for addr in (syms["vec_syscall"], syms["timer_tick"], image.processes[0].symbols["next"]):
        assert c.ask(f"Z0,{addr:x},1") == "OK"
    stops = 0
    for _ in range(5000):
        where = (m.vclock, m._slice_done, m.cpu().eip)       # the stub is waiting: m is still
        reply = c.ask("c")
        if reply.startswith("W"):
            break
        assert reply == "S05"
        assert (m.vclock, m._slice_done, m.cpu().eip) != where      # it ran, even from a breakpoint
        stops += 1
        assert regs(c)["eip"] == m.cpu().eip
        for _ in range(stops % 3):          # sometimes continue straight from the breakpoint
            assert c.ask("s") == "S05"
    assert stops > 20 and reply == "W00"
    assert isinstance(stub.join(), gdb_stub.GuestEnded)
    assert m.console.text() == plain.console.text() and m.exits == plain.exits
    assert (m.vclock, m.ticks) == (plain.vclock, plain.ticks)
    assert bytes(m.ram.view) == bytes(plain.ram.view)


def test_protocol_framing_errors_and_ctrl_c():
    m = Machine(GUESTS["ticker"].build())
    stub = Stub(m)
    c = stub.client
    c.send_raw(b"$g#00")                       # bad checksum: GDB's "-", resend
    assert c.ack() == b"-"
    assert c.ask("vMustReplyEmpty") == "" and c.ask("Xdead,0:") == ""
    c.send_raw(b"$c#63")
    assert c.ack() == b"+"
    c.send_raw(b"\x03")                        # Ctrl-C while the guest runs
    assert c.packet() == "S02"
    assert m.vclock > 0 and not m.halted
    assert c.ask("D") == "OK"
    assert stub.join() == "detach"
    assert m.counter is None                   # nothing left installed after detach


def test_when_gdb_goes_away_mid_slice_the_guest_runs_on_unchanged():
    image = small_counter()
    plain = Machine(image, tick_instructions=1000)
    finish(plain)
    m = Machine(image, tick_instructions=1000)
    stub = Stub(m)
    c = stub.client
    nxt = image.processes[1].symbols["next"]
    assert c.ask(f"Z0,{nxt:x},1") == "OK" and c.ask("c") == "S05"
    assert c.ask("s") == "S05" and m._slice_done > 0          # stopped inside a slice
    c.close()
    assert stub.join() == "lost" and m.counter is None and m.inside_slice
    assert m.run(max_ticks=10_000) == "shutdown"
    assert m.console.text() == plain.console.text() and m.vclock == plain.vclock


def test_a_protected_page_reads_as_ciphertext_through_the_stub():
    image = GUESTS["secret"].build()
    m = Machine(image, key_seed=b"gdb")
    keeper = image.processes[0]
    # Stop while the keeper's address space is current and its pages are protected.
    m.run(until=lambda mm: mm.cpu().cr3 == keeper.cr3 and mm.protection.view()
          and mm.protection.process(keeper.pid).pages, max_ticks=500)
    assert m.cpu().cr3 == keeper.cr3
    stub = Stub(m)
    c = stub.client
    page = next(p for p in m.protection.process(keeper.pid).pages if p.vaddr == abi.IMAGE_VADDR)
    got = bytes.fromhex(c.ask(f"m{abi.IMAGE_VADDR:x},40"))
    assert m.protection.process(keeper.pid).page(abi.IMAGE_VADDR).state == "cloaked"
    assert got == m.ram.read(page.frame << 12, 0x40)          # what is in RAM: ciphertext
    plain_code = b"".join(d for a, d in image.segments)      # the image's bytes
    assert got[:16] not in plain_code
    assert c.ask("D") == "OK"
    assert stub.join() == "detach"


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.one_of(
    st.text(alphabet="gGpPmMzZqHTs?0123456789abcdefx,:=;-", max_size=40),
    st.sampled_from(["m", "m,", "mzz,4", "m-1,4", "m0,-4", "Mffffffff,4:00", "M0,2:00", "P8=zz",
                     "P8=00", "pff", "p-1", "Z0,", "Z0,x,1", "qXfer:features:read:target.xml:",
                     "qXfer:features:read:target.xml:-1,5", "G" + "0" * 7, "Gxx"])))
def test_malformed_packets_get_an_error_or_an_empty_reply_never_an_exception(packet):
    reply = SESSION.dispatch(packet)
    assert isinstance(reply, (str, bytes))
    if (packet[:1] in ("m", "M", "p", "P") or packet.startswith(("Z0,", "z0,"))) and "-" in packet:
        assert reply == "E01"
    assert SESSION.machine.vclock == 0 and not SESSION.machine.halted


# ------------------------------------------------------------- real gdb
@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (apt-get install gdb)")
def test_real_gdb_breakpoint_step_registers_memory_and_exit(tmp_path):
    image = GUESTS["hello"].build()
    syscall = image.kernel_symbols["syscall"]
    user_exit = image.processes[0].entry + 0x11
    msg = image.processes[0].symbols["msg"]
    vmm = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "hello", "--gdb", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = vmm.stderr.readline()          # the stub says where it listens once it does
        addr = re.search(r"waiting for gdb on (\S+:\d+)", line).group(1)
        out = subprocess.run(
            ["gdb", "-nx", "-batch", "-ex", "set architecture i386", "-ex", f"target remote {addr}",
             "-ex", f"break *{syscall:#x}", "-ex", "continue", "-ex", "info registers eax eip cs",
             "-ex", "stepi", "-ex", "p/x $pc", "-ex", "p/x $cr3", "-ex", f"x/s {msg:#x}",
             "-ex", "delete", "-ex", f"break *{user_exit:#x}", "-ex", "continue",
             "-ex", "p/x $eip", "-ex", "info registers",
             "-ex", f"break *{user_exit + 7:#x}", "-ex", "continue", "-ex", "set $ebx = 7",
             "-ex", "continue"],
            capture_output=True, text=True, timeout=120)
        stdout, stderr = vmm.communicate(timeout=120)
    finally:
        vmm.kill()
    log = out.stdout + out.stderr
    assert re.search(rf"Breakpoint 1, {syscall:#010x}", log), log
    assert re.search(r"eax\s+0x80\s", log) and re.search(r"cs\s+0x8\s", log), log
    assert f"$2 = {image.processes[0].cr3:#x}" in log, log
    assert '"hello, world\\n"' in log, log
    assert re.search(r"\$1 = (0x[0-9a-f]+)", log).group(1) != f"{syscall:#x}", log   # stepped
    assert f"Breakpoint 2, {user_exit:#010x}" in log and f"$3 = {user_exit:#x}" in log, log
    # after write() returned: eax = 13 bytes written, the rest as hello.s left them, in
    # GDB's i386 order (a register map out of order shows up here)
    regs_after = dict(re.findall(r"^(\w+)\s+(0x[0-9a-f]+)", log.split(f"$3 = {user_exit:#x}")[1], re.M))
    assert {k: regs_after[k] for k in ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
                                       "eip", "cs", "ss", "ds", "es", "fs", "gs")} == {
        "eax": "0xd", "ecx": "0xd", "edx": "0x0", "ebx": hex(msg), "esp": "0x80000000", "ebp": "0x0",
        "esi": "0x0", "edi": "0x0", "eip": hex(user_exit), "cs": "0x1b", "ss": "0x23", "ds": "0x23",
        "es": "0x23", "fs": "0x0", "gs": "0x0"}, log
    assert "cr3            0x109000" in log, log               # our extra feature, by name
    assert "exited normally" in log, log                        # the kernel's shutdown status 0
    assert vmm.returncode == 0 and stdout == cli("run", "hello").stdout
    assert "exits: pid 1=7" in stderr                           # set $ebx reached exit(7)


# ------------------------------------------------------------------ trace
def test_trace_writes_a_known_sequence_and_changes_nothing(tmp_path):
    trace = tmp_path / "t.txt"
    out = cli("run", "hello", "--trace", str(trace), "--trace-from", "690", "--trace-count", "20",
              "--trace-regs")
    plain = cli("run", "hello")
    assert out.returncode == 0 and out.stdout == plain.stdout
    assert out.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]     # same virtual time
    assert "trace: 20 instructions written" in out.stderr
    lines = [re.match(r"^(\d+) (0x[0-9a-f]{8}) cpl(\d) pid (\d+) ([0-9a-f]*) +(.*?)(?:  (eax=.*))?$", ln)
             for ln in trace.read_text().splitlines()]
    assert len(lines) == 20 and all(lines)
    assert [int(m.group(1)) for m in lines] == list(range(690, 710))
    user = [m for m in lines if m.group(3) == "3" and m.group(4) == "1"]
    # hello.s, as assembled: its first four instructions, then the kernel's entry
    assert [(m.group(2), m.group(6)) for m in user[:4]] == [
        ("0x40001000", "mov eax, 2"), ("0x40001005", "mov ebx, 0x4000101a"),
        ("0x4000100a", "mov ecx, 0xd"), ("0x4000100f", "int 0x80")]
    assert user[0].group(5) == "b802000000" and "eax=0x2 " in user[1].group(7)
    after = lines[lines.index(user[3]) + 1]
    assert after.group(3) == "0" and int(after.group(2), 16) == GUESTS["hello"].build().kernel_symbols["vec_syscall"]


# --------------------------------------------------------- crash reports
KERNEL = (KERNEL_DIR / "kernel.s").read_text()


def crash_image(tmp_path, name, old, new, programs):
    assert old in KERNEL
    path = tmp_path / f"{name}.mvimg"
    path.write_bytes(build_image(programs, kernel_source=KERNEL.replace(old, new, 1)).to_bytes())
    return str(path)


def test_crash_report_for_each_kind(tmp_path):
    panic = crash_image(tmp_path, "panic", "sys_getpid:\n    mov eax, [esi+PROC_PID]",
                        "sys_getpid:\n    mov eax, [0x0]", [Program("getpid", "mov eax, SYS_GETPID\nint 0x80\nud2")])
    triple = crash_image(tmp_path, "triple", "    .word 0x7ff                     ; 256 gates * 8 - 1",
                         "    .word 0x0", [P("hello")])
    out = cli("run", panic)
    assert out.returncode == 1
    assert "crash report: panic" in out.stderr and "fault: #PF(14) at eip" in out.stderr
    assert re.search(r"=> 0x[0-9a-f]+: a100000000 +mov eax, dword ptr \[0\]", out.stderr), out.stderr
    assert "cpl=0" in out.stderr and "Halted reason=panic" in out.stderr
    out = cli("run", triple)
    assert out.returncode == 1 and "crash report: triple-fault" in out.stderr
    assert "registers now" in out.stderr and "Syscall pid=1 call=write(2)" in out.stderr
    out = cli("run", "crashers")
    assert out.returncode == 0
    reports = out.stderr.count("crash report: pid")
    assert reports == 7, out.stderr
    assert "crash report: pid 5 (crasher4) was killed by the kernel (exit status 128)" in out.stderr
    assert re.search(r"fault: #DE\(0\) at eip .*\n(.*\n)*?.*=> 0x[0-9a-f]+: f7f1 +div ecx", out.stderr)
    first = out.stderr.split("crash report: pid 1 (crasher0)")[1].split("crash report:")[0]
    assert "cr2=0x00100000" in first, first             # CR2 of this #PF, not a stale one


# ------------------------------------------------------------------- asm
GOOD = """; tiny: prints one line, exits 3
_start:
    mov esi, msg
    call ulib_puts
    mov eax, 3
    call ulib_exit
msg: .asciz "tiny here\\n"
.include "_ulib.s"
"""


def test_asm_builds_and_runs_a_program_and_names_the_broken_line(tmp_path):
    src = tmp_path / "tiny.s"
    src.write_text(GOOD)
    out = cli("asm", str(src), "-o", str(tmp_path / "tiny.mvimg"))
    assert out.returncode == 0, out.stderr
    ran = cli("run", str(tmp_path / "tiny.mvimg"))
    assert ran.returncode == 0 and "tiny here" in ran.stdout and "pid 1=3" in ran.stderr
    direct = cli("run", str(src))
    assert direct.returncode == 0 and direct.stdout == ran.stdout
    bad = tmp_path / "broken.s"
    bad.write_text(GOOD.replace("    mov eax, 3\n", "    mov eax, 3\n    movx eax, 4\n"))
    for args in (("asm", str(bad)), ("run", str(bad))):
        out = cli(*args)
        assert out.returncode == 2 and f"{bad}:6: Invalid mnemonic" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "broken.mvimg").exists()
    out = cli("asm", str(tmp_path / "missing.s"))
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_debugging_options_refuse_what_they_would_ignore():
    out = cli("run", "hello", "--trace-count", "5")
    assert out.returncode == 2 and "--trace-count: only with --trace FILE" in out.stderr
    out = cli("run", "hello", "--gdb", "127.0.0.1:70000")
    assert out.returncode == 2 and "port must be 0..65535" in out.stderr and "Traceback" not in out.stderr
    out = cli("run", "hello", "--gdb", "1234", "--migrate-to", "127.0.0.1:9")
    assert out.returncode == 2 and "not with --migrate-to" in out.stderr


def test_gdb_kill_ends_the_run_and_saves_a_state_that_continues_unchanged(tmp_path):
    image = GUESTS["hello"].build()
    state = tmp_path / "k.mvstate"
    vmm = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "hello", "--gdb", "127.0.0.1:0",
                            "--save-state", str(state)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host, port = re.search(r"waiting for gdb on (\S+):(\d+)", vmm.stderr.readline()).groups()
        c = Client(host, int(port))
        assert c.ask(f"Z0,{image.processes[0].entry + 5:x},1") == "OK" and c.ask("c") == "S05"
        assert c.ask("s") == "S05"                      # stopped inside a slice
        c.send_raw(b"$k#6b")
        assert c.ack() == b"+"
        stdout, stderr = vmm.communicate(timeout=120)
    finally:
        vmm.kill()
    assert vmm.returncode == 130 and "gdb killed the run" in stderr
    assert "machine state saved" in stderr
    rest = cli("run", str(state), "--restore")
    assert rest.returncode == 0
    assert stdout + rest.stdout == cli("run", "hello").stdout


def test_ctrl_c_while_waiting_for_gdb_ends_the_run():
    vmm = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "hello", "--gdb", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "waiting for gdb" in vmm.stderr.readline()
        vmm.send_signal(signal.SIGINT)
        _, stderr = vmm.communicate(timeout=120)
    finally:
        vmm.kill()
    assert vmm.returncode == 130 and "interrupted while waiting for gdb" in stderr
