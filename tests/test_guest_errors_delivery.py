"""A broken or hostile kernel is a guest error, never a VMM exception (issue 9
item 5): every delivery and descriptor path, fed bad tables, ends in the
architectural #DF or a triple fault, reported as a guest crash."""

import pytest

from guests.build import Program, build_image, kernel_text
from minivmm.errors import GuestError, VmmInternalError
from minivmm.machine import Machine

# Each breaks one thing from the system-call hook (CPL0, paging on), so the
# next delivery -- the timer or a system call from user mode -- meets it.
BREAKS = {
    "tss ss0 is a code selector": "    mov dword ptr [tss+8], SEL_KCODE\n",
    "tss ss0 beyond the gdt": "    mov dword ptr [tss+8], 0x1F0\n",
    "tss ss0 is a user data selector": "    mov dword ptr [tss+8], SEL_UDATA\n",
    "tss esp0 outside ram": "    mov dword ptr [tss+4], 0xFFFFFF00\n",
    "gate selector is a data segment": "    mov eax, idt\n    mov word ptr [eax+0x402], SEL_KDATA\n"
                                       "    mov word ptr [eax+0x102], SEL_KDATA\n",
    "gate selector is the tss": "    mov eax, idt\n    mov word ptr [eax+0x402], SEL_TSS\n"
                                "    mov word ptr [eax+0x102], SEL_TSS\n",
    "gate selector is a user code segment": "    mov eax, idt\n    mov word ptr [eax+0x402], SEL_UCODE\n"
                                            "    mov word ptr [eax+0x102], SEL_UCODE\n",
    "code descriptor not present": "    mov eax, gdt\n    and dword ptr [eax+12], 0xFFFF7FFF\n",
    "idt outside ram, paging off": "    mov eax, cr0\n    and eax, 0x7FFFFFFF\n    mov cr0, eax\n"
                                   "    lidt [far_table]\n    int 0x80\n",
    "kernel stack outside ram, paging off": "    mov eax, cr0\n    and eax, 0x7FFFFFFF\n    mov cr0, eax\n"
                                            "    mov eax, 0xFFFFFFF0\n    mov esp, eax\n    int 0x80\n",
    "gdt outside ram": "    lgdt [far_table]\n",
}


@pytest.mark.parametrize("what", sorted(BREAKS))
def test_a_broken_delivery_path_is_a_guest_crash(what):
    hook = ("syscall_hook:\n" + BREAKS[what] + "    ret\n"
            "far_table: .word 0x7ff\n    .long 0xFFFF0000\n")     # a table beyond RAM
    m = Machine(build_image([Program.builtin("sysloop", data_pages=1, args=(50, 0))],
                            kernel_source=kernel_text().replace('.include "hook_none.s"', hook)))
    try:
        m.run(max_ticks=300)
    except VmmInternalError:
        raise
    except GuestError:
        assert m.halted in ("triple-fault", "crash", "panic")      # the CLI's exit 1
    else:
        # The broken gate was only one of them: #DF got through, and the
        # kernel killed the process with it, as on a real CPU.
        assert "killed pid 1: vector 8 at" in m.console.text(), m.console.text()
