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
    m, seen = keeper_under(PAGING_OFF.replace("    MODE\n", READ), protection=protection)
    assert m.run(max_ticks=3000) == "shutdown"
    kernel = m.console.text(0).encode("utf-8", "replace")
    if not protection:
        assert b"|" + SECRET + b"|" in kernel
    else:
        assert b"swordfish" not in kernel and kernel.count(b"|") == 2
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
