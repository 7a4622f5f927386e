"""Guest-visible behaviour of the toy kernel under the VMM (real keystone-built guests)."""

import re


from guests.build import Program
from guesthelp import boot, prog
from minivmm import abi

P = Program.builtin


def test_hello_runs_and_shuts_down_cleanly():
    m = boot(P("hello"))
    assert m.run(max_ticks=100) == "shutdown"
    assert m.console.text(1) == "hello, world\n"
    assert m.exits == {1: 0}
    assert m.shutdown_status == 0


def test_preemption_interleaves_processes():
    from minivmm.events import ConsoleOutput
    m = boot(P("counter", args=(6, 300_000), as_name="a"), P("counter", args=(6, 300_000), as_name="b"))
    writers = []
    m.events.subscribe(lambda e: writers.append(e.pid), ConsoleOutput)
    assert m.run(max_ticks=5000) == "shutdown"
    writers = [w for w in writers if w]
    # Each counter is preempted mid-sequence, so the writers alternate
    # instead of all of pid 1's lines coming before pid 2's.
    switches = sum(1 for a, b in zip(writers, writers[1:]) if a != b)
    assert switches >= 6, writers
    assert m.console.text(1).splitlines() == [f"counter {i}" for i in range(1, 7)]
    assert m.console.text(2).splitlines() == [f"counter {i}" for i in range(1, 7)]
    assert m.ticks > 10


SYSCALLS = """
_start:
    mov eax, SYS_GETPID
    int 0x80
    mov [pid], eax
    mov eax, SYS_TICKS
    int 0x80
    mov [t0], eax
    mov eax, SYS_SLEEP
    mov ebx, 5
    int 0x80
    mov [slept], eax
    mov eax, SYS_TICKS
    int 0x80
    mov [t1], eax
    mov eax, SYS_YIELD
    int 0x80
    mov [yielded], eax
    mov eax, 99
    int 0x80
    mov [nosys], eax
    mov eax, SYS_WRITE
    mov ebx, 0x60000000            ; user range, unmapped: the kernel's copy faults
    mov ecx, 4
    int 0x80
    mov [efault_unmapped], eax
    mov eax, SYS_WRITE
    mov ebx, 0x00100000            ; kernel memory: refused before any copy
    mov ecx, 4
    int 0x80
    mov [efault_kernel], eax
    mov eax, SYS_WRITE
    mov ebx, msg
    mov ecx, 5000                  ; more than 4096
    int 0x80
    mov [einval], eax
    mov eax, SYS_WRITE
    mov ebx, msg
    mov ecx, 3
    int 0x80
    mov [written], eax
    mov eax, SYS_EXIT
    mov ebx, 42
    int 0x80
    ud2                            ; never reached
msg: .ascii "ok\\n"
pid: .long 0
t0: .long 0
t1: .long 0
slept: .long 0
yielded: .long 0
nosys: .long 0
efault_unmapped: .long 0
efault_kernel: .long 0
einval: .long 0
written: .long 0
"""


def test_each_system_call_semantics():
    m = boot(P("hello"), prog("sys", SYSCALLS))
    assert m.run(max_ticks=1000) == "shutdown"
    syms = m.image.processes[1].symbols
    # The exited process's memory is still there for a post-mortem read.
    cr3 = m.image.processes[1].cr3

    def word(name):
        return int.from_bytes(m.read_virtual(cr3, syms[name], 4), "little")

    def signed(name):
        v = word(name)
        return v - (1 << 32) if v & 0x80000000 else v

    assert word("pid") == 2
    assert word("t1") - word("t0") >= 5                 # sleep(5) slept 5 ticks at least
    assert word("slept") == 0 and word("yielded") == 0
    assert signed("nosys") == -abi.ENOSYS
    assert signed("efault_unmapped") == -abi.EFAULT
    assert signed("efault_kernel") == -abi.EFAULT
    assert signed("einval") == -abi.EINVAL
    assert word("written") == 3
    assert m.console.text(2) == "ok\n"
    assert m.exits[2] == 42
    procs = {p.pid: p for p in m.processes()}
    assert procs[2].state == "exited" and procs[2].exit_status == 42


def test_faulting_processes_are_killed_and_others_continue():
    crashers = [P("crasher", args=(i,), as_name=f"crash{i}") for i in range(7)]
    m = boot(*crashers, P("counter", args=(10, 50_000)))
    assert m.run(max_ticks=5000) == "shutdown"
    text = m.console.text()
    expected = {1: abi.VEC_PF, 2: abi.VEC_PF, 3: abi.VEC_PF, 4: abi.VEC_GP,
                5: abi.VEC_DE, 6: abi.VEC_UD, 7: abi.VEC_GP}
    for pid, vector in expected.items():
        assert re.search(rf"killed pid {pid}: vector {vector} at eip 0x4000", text), text
        assert m.exits[pid] == 128 + vector
    assert "still alive" not in text
    assert m.console.text(8).splitlines()[-1] == "counter 10"     # the survivor finished
    assert m.exits[8] == 0
    procs = {p.pid: p for p in m.processes()}
    assert procs[1].fault_address == 0x00100000                   # kernel memory
    assert procs[2].fault_address == 0x60000000                   # unmapped
    assert procs[3].fault_address == abi.INFO_VADDR               # read-only page
    assert all(procs[p].state == "killed" for p in expected)


def test_many_faults_in_a_row_are_each_delivered_not_double_faults():
    # Unicorn reports the second exception as #DF unless the VMM resets its
    # exception state (upstream issue #1883): ten faults, ten #PF kills.
    m = boot(*[P("crasher", args=(1,), as_name=f"c{i}") for i in range(10)], P("hello"))
    assert m.run(max_ticks=1000) == "shutdown"
    assert m.console.text().count("vector 14 at") == 10
    assert "vector 8" not in m.console.text()


def test_runs_are_deterministic():
    def run():
        m = boot(P("counter", args=(5, 200_000), as_name="a"), P("memcheck", args=(3,)),
                 P("counter", args=(5, 150_000), as_name="b"))
        m.run(max_ticks=10_000)
        return m.console.text(), m.vclock, m.ticks
    assert run() == run()


def test_memcheck_and_dirtier_complete():
    m = boot(P("memcheck", args=(4,)), P("dirtier", args=(16, 20, 1)))
    assert m.run(max_ticks=5000) == "shutdown"
    assert m.console.text(1).splitlines()[-1] == "memcheck: gen 4 ok"
    assert m.console.text(2).endswith("dirtier: done\n")
    assert m.exits == {1: 0, 2: 0}


def test_memcheck_detects_a_lost_write():
    m = boot(P("memcheck", args=(0,)))
    # Run until the first generation is written, then undo a write behind the
    # guest's back (what a migration that forgot a page would do).
    m.run(until=lambda m: "gen 2 ok" in m.console.text(), max_ticks=1000)
    from minivmm.mmu import walk
    cr3 = m.image.processes[0].cr3
    page, _ = walk(m.ram, cr3, abi.DATA_VADDR + 5 * 0x1000, write=False, user=True)
    m.ram.set_u32(page, 0xDEAD)
    m.run(max_ticks=1000)
    assert "memcheck: MISMATCH page 5" in m.console.text()
    assert m.exits[1] == 1


def test_bounds_stop_a_guest_that_runs_forever():
    m = boot(P("counter", args=(0, 100_000)))
    assert m.run(max_ticks=7) == "ticks"
    assert m.ticks == 7
    assert m.run(max_instructions=250_000) == "instructions"
