"""No stale translations (issue 9 item 3).

The emulator caches translated code by (virtual pc, physical page); the VMM
rewrites frames behind its back (cloak, uncloak, restore).  Here a hostile
kernel maps a protected process's code frame into a spy at the same virtual
address: the spy's touch cloaks the frame, and the spy must then run what
the frame holds now (ciphertext), not a translation of the plaintext."""

import pytest

from guests.build import build_image, kernel_text
from guesthelp import prog
from minivmm.machine import Machine

SECRET = 0x5EC2E7ED

VICTIM = f"""
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz loop
    call ulib_protect
loop:
    call secret_fn                 ; translated, and cached, with the secret inside
    mov eax, SYS_YIELD
    int 0x80
    dec dword ptr [rounds]
    jnz loop
    xor eax, eax
    call ulib_exit
secret_fn:
    mov eax, {SECRET:#x}
    ret
rounds: .long 30
.include "_ulib.s"
"""

# Its own code starts two pages in: its first image page is where the kernel
# puts the victim's code frame.  args[0] = the victim's secret_fn.
SPY = """
_start:
    jmp main
    .space 8192, 0x90
main:
    mov eax, SYS_YIELD
    int 0x80
    mov eax, SYS_YIELD
    int 0x80                        ; the kernel remaps at this call
    xor eax, eax
    call ulib_arg
    call eax                        ; the victim's code, at its own address
    call ulib_putdec
    xor eax, eax
    call ulib_exit
.include "_ulib.s"
"""

# At the spy's 2nd system call: its PTE for 0x40001000 := the victim's (slot 0).
REMAP = r"""
syscall_hook:
    cmp dword ptr [esi+PROC_PID], 2
    jne rm_out
    inc dword ptr [rm_n]
    cmp dword ptr [rm_n], 2
    jne rm_out
    mov eax, proc_table
    mov eax, [eax+PROC_CR3]
    mov eax, [eax+0x400]
    and eax, 0xFFFFF000
    mov ebx, [eax+4]                ; the victim's PTE of 0x40001000
    mov eax, [esi+PROC_CR3]
    mov eax, [eax+0x400]
    and eax, 0xFFFFF000
    mov [eax+4], ebx
    mov eax, cr3
    mov cr3, eax
rm_out:
    ret
rm_n: .long 0
"""


@pytest.mark.parametrize("protect", [0, 1])
def test_a_spy_on_a_protected_code_frame_runs_no_stale_translation(protect):
    victim = prog("victim", VICTIM, data_pages=1, args=(0, protect))
    image = build_image([victim], name="probe")
    secret_fn = image.processes[0].symbols["secret_fn"]
    source = kernel_text().replace('.include "hook_none.s"', REMAP)
    m = Machine(build_image([victim, prog("spy", SPY, data_pages=1, args=(secret_fn,))],
                            kernel_source=source), key_seed=b"translations")
    m.run(max_ticks=2000)
    assert m.exits[1] == 0                          # the victim never notices
    if not protect:
        assert m.console.text(2) == str(SECRET)     # the attack works on plaintext
    else:
        assert str(SECRET) not in m.console.text(2)
        assert m.exits[2] != 0                      # it ran ciphertext and crashed
