"""Every path to a protected frame goes through the policy (issue 9).

Each test is a hostile kernel (a system-call hook in place of
``hook_none.s``) against the unmodified secret keeper; each attack works
without protection (shown by the same test) and fails with it.
"""

import pytest

from test_protection_attacks import SECRET, keeper_under
from minivmm import events as ev

# Finds the keeper's secret frame through its page tables, turns paging off,
# and reads (or overwrites) the frame physically; paging on again after.
PAGING_OFF = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne po_out
    push esi
    mov eax, [esi+PROC_CR3]
    mov ebx, [eax+0x408]
    and ebx, 0xFFFFF000
    mov ebx, [ebx+4]
    and ebx, 0xFFFFF000          ; ebx = physical address of the secret page
    mov eax, cr0
    and eax, 0x7FFFFFFF
    mov cr0, eax                 ; paging off: the kernel is identity mapped, it runs on
    MODE
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov esi, po_nl
    call puts
    pop esi
po_out:
    ret
po_nl: .asciz "|\n"
"""
READ = r"""
    mov ecx, 32
    mov dx, PORT_CONSOLE
    mov al, 0x7C
    out dx, al
po_loop:
    mov al, [ebx]
    out dx, al
    inc ebx
    dec ecx
    jnz po_loop
"""
WRITE = "    mov dword ptr [ebx], 0x4b434148\n"


@pytest.mark.parametrize("protection", [False, True])
def test_paging_off_reads_see_only_ciphertext(protection):
    m, seen = keeper_under(PAGING_OFF.replace("    MODE\n", READ), protection=protection,
                           key_seed=b"paging-off")          # reproducible ciphertext
    assert m.run(max_ticks=3000) == "shutdown"
    kernel = m.console.text(0).encode("utf-8", "replace")
    if not protection:
        assert b"|" + SECRET + b"|" in kernel
    else:
        assert b"swordfish" not in kernel and b"|\n" in kernel        # it read, and saw noise
        assert m.exits == {1: 0} and not [e for e in seen if isinstance(e, ev.IntegrityViolation)]


@pytest.mark.parametrize("protection", [False, True])
def test_paging_off_writes_are_caught_at_the_owners_next_touch(protection):
    m, seen = keeper_under(PAGING_OFF.replace("    MODE\n", WRITE), protection=protection)
    assert m.run(max_ticks=3000) == "shutdown"
    if not protection:
        assert "SECRET CHANGED" in m.console.text(1)
    else:
        assert "SECRET CHANGED" not in m.console.text(1)
        [v] = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
        assert v.vaddr == 0x40801000 and "MAC" in v.reason


# Before the program asks for protection, maps 17 large pages (17 * 1024
# frames, all the same 4 MiB of low RAM) into its address space.
MAP_HUGE = r"""
syscall_hook:
    cmp dword ptr [INFO_NARGS_ADDR], 0
    je mh_out
    mov eax, [esi+PROC_CR3]
    mov ecx, 17
    lea ebx, [eax+0x480]                 ; PDE of 0x48000000
mh_loop:
    mov dword ptr [ebx], 0x00000087      ; 4 MiB page at 0, user, writable, present
    add ebx, 4
    dec ecx
    jnz mh_loop
    mov eax, cr3
    mov cr3, eax
mh_out:
    ret
"""

ASKS_AFTER_A_YIELD = r"""
_start:
    mov eax, SYS_YIELD
    int 0x80
    call ulib_protect
    neg eax
    call ulib_putdec
    xor eax, eax
    call ulib_exit
.include "_ulib.s"
"""


def test_one_hc_protect_is_bounded_whatever_the_kernel_maps():
    from guests.build import build_image, kernel_text
    from guesthelp import prog
    from minivmm import abi
    from minivmm.machine import Machine
    source = kernel_text().replace('.include "hook_none.s"', MAP_HUGE)
    m = Machine(build_image([prog("big", ASKS_AFTER_A_YIELD, data_pages=1, args=(1,))],
                            kernel_source=source))
    assert m.run(max_ticks=500) == "shutdown"
    assert m.console.text(1) == str(abi.E2BIG)        # refused before any work beyond the bound
    assert not m.protection.view()
