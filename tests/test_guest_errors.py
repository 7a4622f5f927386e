"""A crashing guest gets a clear error, never a hang or a raw Unicorn traceback."""

import pytest

from guests.build import KERNEL_DIR, Program, build_image
from minivmm.errors import GuestHang, KernelPanic, TripleFault, VmmError
from minivmm.machine import Machine

KERNEL = (KERNEL_DIR / "kernel.s").read_text()


def kernel_with(old, new):
    assert old in KERNEL, old
    return KERNEL.replace(old, new, 1)


def boot_with_kernel(source, *programs):
    return Machine(build_image(list(programs) or [Program.builtin("hello")], kernel_source=source))


def test_kernel_panic_is_reported():
    src = kernel_with("sys_getpid:\n    mov eax, [esi+PROC_PID]", "sys_getpid:\n    mov eax, [0x0]")
    m = boot_with_kernel(src, Program("getpid", "mov eax, SYS_GETPID\nint 0x80\nud2"))
    with pytest.raises(KernelPanic, match="vector 0xe"):
        m.run(max_ticks=100)
    assert "toykernel: PANIC vector 0x0000000e" in m.console.text()
    assert m.halted == "panic"
    with pytest.raises(VmmError, match="halted"):
        m.step()


def test_undeliverable_interrupt_is_a_triple_fault():
    src = kernel_with("    .word 0x7ff                     ; 256 gates * 8 - 1", "    .word 0x0")
    m = boot_with_kernel(src)
    with pytest.raises(TripleFault, match="beyond the IDT limit"):
        m.run(max_ticks=100)
    assert m.halted == "triple-fault"


def test_missing_gate_becomes_double_fault_then_triple_fault():
    no_syscall_gate = kernel_with("    .long VEC_SYSCALL, vec_syscall, 0xEE",
                                  "    .long VEC_SYSCALL, vec_syscall, 0x0E")
    m = boot_with_kernel(no_syscall_gate, Program.builtin("hello"), Program.builtin("hello"))
    assert m.run(max_ticks=100) == "shutdown"
    assert m.console.text().count("vector 8 at") == 2       # #DF kills each caller
    neither = no_syscall_gate.replace("    .long 8, vec8, 0x8E", "    .long 8, vec8, 0x0E")
    m = boot_with_kernel(neither)
    with pytest.raises(TripleFault, match="not present"):
        m.run(max_ticks=100)


def test_hlt_with_interrupts_disabled_is_a_hang_not_a_spin():
    src = kernel_with("    mov dword ptr [rr], 15          ; NPROC - 1: the first pick is slot 0\n    jmp schedule",
                      "    cli\nstuck:\n    hlt\n    jmp stuck")
    m = boot_with_kernel(src)
    with pytest.raises(GuestHang, match="hlt with interrupts disabled"):
        m.run(max_ticks=100)
    assert m.halted == "hang"


def test_user_int_through_a_kernel_only_gate_is_a_gp():
    # Gate 13 has DPL0: int 13 from user mode must be #GP, as on a real CPU.
    m = boot_with_kernel(KERNEL, Program("badint", "int 0x20\nud2"), Program.builtin("hello"))
    assert m.run(max_ticks=100) == "shutdown"
    assert "killed pid 1: vector 13" in m.console.text()
    assert m.console.text(2) == "hello, world\n"
