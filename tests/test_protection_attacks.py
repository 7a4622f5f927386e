"""Process protection against a kernel that attacks the VMM's own bookkeeping.

Regression cases from review: each is a hostile kernel (a system-call hook
in place of ``hook_none.s``) against the unmodified, protected secret keeper.
"""

import struct

import pytest

from guests.build import Program, build_image, kernel_text
from guesthelp import prog
from minivmm import events as ev
from minivmm.machine import Machine
from minivmm.protection import PLAINTEXT
from minivmm.state import MachineState

SECRET = b"swordfish: launch code 4-8-15-16"


def keeper_under(hook: str, *, kernel_patch=None, **kw):
    source = kernel_text().replace('.include "hook_none.s"', hook)
    if kernel_patch:
        source = kernel_patch(source)
    m = Machine(build_image([Program.builtin("keeper", data_pages=3, args=(5, 1))],
                            kernel_source=source), **kw)
    seen = []
    m.events.subscribe(seen.append, ev.IntegrityViolation, ev.RegisterTamper, ev.PageAdopted)
    return m, seen


def assert_frames_consistent(m):
    """Every plaintext protected page is known by its frame (so the fill hook cloaks it)."""
    prot = m.protection
    for proc in prot.procs.values():
        if proc.exited:
            continue
        for meta in proc.pages.values():
            if meta.state == PLAINTEXT:
                assert prot.frames.get(meta.ppn, (None, None))[1] is meta, (proc.pid, hex(meta.vpn))


# Moves the stack page into the secret's frame and back, restoring the secret's
# ciphertext behind the VMM's back, then reads the secret frame directly.
SHUFFLE = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 3
    je x_step1
    cmp eax, 4
    je x_step2
    cmp eax, 7
    je x_step3
x_out:
    ret
x_step1:                     ; keeper is in write(); next it touches its stack, not the secret
    push esi
    cld
    mov eax, [esi+PROC_CR3]
    mov ebx, [eax+0x408]
    and ebx, 0xFFFFF000
    mov ecx, [ebx+4]
    and ecx, 0xFFFFF000
    mov [x_fs], ecx          ; FS: the secret's frame
    mov edx, [eax+0x7FC]
    and edx, 0xFFFFF000
    add edx, 0xFFC
    mov [x_kpte], edx        ; &PTE of the top stack page
    mov edx, [edx]
    mov [x_kval], edx
    and edx, 0xFFFFF000
    mov [x_fk], edx          ; FK: the stack page's frame
    mov esi, [x_fs]          ; save ctS (reading FS cloaks the secret)
    mov edi, x_save
    mov ecx, 1024
    rep movsd
    mov esi, [x_fk]          ; stack ciphertext -> FS
    mov edi, [x_fs]
    mov ecx, 1024
    rep movsd
    mov edx, [x_kpte]        ; stack page now lives in FS
    mov eax, [x_kval]
    and eax, 0xFFF
    or eax, [x_fs]
    mov [edx], eax
    mov eax, cr3
    mov cr3, eax
    pop esi
    ret
x_step2:                     ; move the stack back to FK and put ctS back into FS
    push esi
    cld
    mov esi, [x_fs]
    mov edi, [x_fk]
    mov ecx, 1024
    rep movsd
    mov edx, [x_kpte]
    mov eax, [x_kval]
    mov [edx], eax
    mov esi, x_save
    mov edi, [x_fs]
    mov ecx, 1024
    rep movsd
    mov eax, cr3
    mov cr3, eax
    pop esi
    ret
x_step3:                     ; the secret is plaintext in FS, and FS is no longer in frames
    push esi
    mov esi, x_msg
    call puts
    mov ebx, [x_fs]
    mov ecx, 32
    mov dx, PORT_CONSOLE
x_loop:
    mov al, [ebx]
    out dx, al
    inc ebx
    dec ecx
    jnz x_loop
    mov esi, x_nl
    call puts
    pop esi
    ret
x_msg: .asciz "EXPLOIT read FS: "
x_nl: .asciz "\n"
x_fs: .long 0
x_fk: .long 0
x_kpte: .long 0
x_kval: .long 0
x_save: .space 4096, 0
"""

# Tells the VMM the keeper exited (a lie), then lets it run on.
FORGED_EXIT = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne x_out
    push esi
    mov ebx, [esi+PROC_PID]
    xor ecx, ecx
    mov eax, HC_PROC_EXIT
    int 0x82
    pop esi
x_out:
    ret
"""

# Points TSS.esp0 into the secret's frame: the VMM's own frame push would write there.
ESP0_INTO_SECRET = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 3
    je x_arm
    cmp eax, 4
    je x_disarm
x_out:
    ret
x_arm:                          ; TSS.esp0 := phys(secret frame) + 20
    mov eax, [esi+PROC_CR3]
    mov ebx, [eax+0x408]
    and ebx, 0xFFFFF000
    mov ecx, [ebx+4]
    and ecx, 0xFFFFF000
    add ecx, 4
    mov [tss+4], ecx
    ret
x_disarm:
    mov dword ptr [tss+4], kstack_top
    ret
"""

# Scans all of RAM after the kernel image (whose code holds the patterns)
# through the kernel's identity map for the secret (at every 4-byte alignment:
# one of its first four dwords is aligned wherever it starts) at the keeper's
# 2nd, 4th and 6th system calls; prints FOUND or clean.
SCAN = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    test eax, eax
    jz sc_out
    test eax, 1
    jnz sc_out
    cmp eax, 6
    ja sc_out
    push esi
    mov ebx, kstack_top
    and ebx, 0xFFFFF000
sc_loop:
    mov eax, [ebx]
    cmp eax, 0x726f7773            ; "swor"
    je sc_found
    cmp eax, 0x6664726f            ; "ordf"
    je sc_found
    cmp eax, 0x64726f77            ; "word"
    je sc_found
    cmp eax, 0x69666472            ; "rdfi"
    je sc_found
    add ebx, 4
    cmp ebx, 0x1000000
    jb sc_loop
    mov esi, sc_clean
    call puts
    pop esi
sc_out:
    ret
sc_found:
    mov esi, sc_hit
    call puts
    mov eax, ebx
    call puthex
    mov esi, sc_nl
    call puts
    pop esi
    ret
sc_clean: .asciz "scan: clean\n"
sc_hit:   .asciz "scan: FOUND at "
sc_nl:    .asciz "\n"
"""


@pytest.mark.parametrize("protection", [False, True])
def test_a_kernel_scanning_all_of_ram_never_finds_the_plaintext(protection):
    m, seen = keeper_under(SCAN, protection=protection)
    assert m.run(max_ticks=5000) == "shutdown"
    kernel = m.console.text(0)
    if not protection:
        assert "scan: FOUND" in kernel                     # the scan can find it
    else:
        assert kernel.count("scan: clean") == 3 and "FOUND" not in kernel
        assert m.console.text(1).count("secret intact") == 5 and m.exits == {1: 0}
        assert not [e for e in seen if isinstance(e, ev.IntegrityViolation)]


def test_moving_pages_behind_the_vmms_back_does_not_expose_plaintext():
    m, seen = keeper_under(SHUFFLE, key_seed=b"x")
    checks = []
    m.events.subscribe(lambda e: checks.append(assert_frames_consistent(m)), ev.PageUncloaked)
    assert m.run(max_ticks=3000) == "shutdown"
    assert "EXPLOIT read FS" in m.console.text(0)         # the attack ran to the end...
    assert b"swordfish" not in m.console.text(0).encode("utf-8", "replace")   # ...and saw noise
    assert checks


def test_a_forged_exit_does_not_let_the_process_run_unprotected():
    m, seen = keeper_under(FORGED_EXIT)
    assert m.run(max_ticks=3000) == "shutdown"
    [v] = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    assert "after the kernel reported it exited" in v.reason
    assert m.exits[1] == 142 and m.protection.process(1).exited
    assert m.protection.frames == {}                      # its frames are the kernel's again


def test_the_vmms_own_frame_push_into_a_protected_page_is_caught():
    def fourteen_words(src):
        old = "    mov ecx, FRAME_WORDS\n    rep movsd\n    cmp eax, VEC_TIMER"
        assert src.count(old) == 1
        return src.replace(old, "    mov ecx, 14\n    rep movsd\n    mov dword ptr [edi], 0x23\n"
                                "    cmp eax, VEC_TIMER")
    m, seen = keeper_under(ESP0_INTO_SECRET, kernel_patch=fourteen_words)
    assert m.run(max_ticks=3000) == "shutdown"
    assert "SECRET CHANGED" not in m.console.text(1)
    [v] = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    assert v.vaddr == 0x40801000 and "MAC" in v.reason


STACK_SECRET = r"""
_start:
    call ulib_protect
    test eax, eax
    jnz bad
    push 0x6873696f
    push 0x66647277
    push 0x6f535f5f                ; "__Sowrdfoish" on the stack
lp: mov eax, SYS_YIELD
    int 0x80
    dec dword ptr [cnt]
    jnz lp
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 1
    call ulib_exit
cnt: .long 20
.include "_ulib.s"
"""


def test_large_pages_are_protected_frame_by_frame():
    image = build_image([prog("stk", STACK_SECRET, data_pages=1)])
    m = Machine(image)
    pd = image.processes[0].cr3 & ~0xFFF     # the kernel maps the stack with one 4 MiB page
    m.ram.write(pd + 0x1FF * 4, struct.pack("<I", 0x400000 | 0x80 | 7))
    m.run(until=lambda m: m.protection.view() and m.timer.delivered > 5)
    pages = {p.vaddr for p in m.protection.process(1).pages}
    assert 0x7FFFF000 in pages and 0x7FC00000 in pages
    kview = m.read_virtual(m.cpu().cr3, 0x1000, (16 << 20) - 0x1000, user=False)
    assert b"__Sowrdfoish" not in kview
    assert m.run(max_ticks=500) == "shutdown" and m.exits == {1: 0}


MAP_LATER = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 1
    jne ml_out
    ; after HC_PROTECT: map a fresh frame at 0x40803000 (the 4th data page slot)
    mov eax, [esi+PROC_CR3]
    mov eax, [eax+0x408]
    and eax, 0xFFFFF000
    mov dword ptr [eax+12], 0x00F00007     ; frame 0xF00000, user, writable, present
    mov eax, cr3
    mov cr3, eax
ml_out:
    ret
"""

USES_NEW_PAGE = r"""
_start:
    call ulib_protect
    mov esi, hi
    call ulib_puts                 ; system call 1: the kernel maps the new page
    mov dword ptr [0x40803000], 0x726f7773   ; "swor" into the page mapped after protect
    mov eax, SYS_YIELD
    int 0x80
    mov eax, [0x40803000]
    cmp eax, 0x726f7773
    jne bad
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 1
    call ulib_exit
hi: .asciz "hi\n"
.include "_ulib.s"
"""


def test_a_page_mapped_after_protect_is_adopted_at_first_touch():
    source = kernel_text().replace('.include "hook_none.s"', MAP_LATER)
    m = Machine(build_image([prog("late", USES_NEW_PAGE, data_pages=3)], kernel_source=source))
    adopted = []
    m.events.subscribe(adopted.append, ev.PageAdopted)
    assert m.run(max_ticks=500) == "shutdown" and m.exits == {1: 0}
    assert [(e.pid, e.vaddr, e.frame) for e in adopted] == [(1, 0x40803000, 0xF00)]
    assert m.ram.read(0xF00000, 4) != b"swor"             # cloaked at exit, like the rest


def test_a_state_restored_twice_never_repeats_a_nonce():
    m = Machine(build_image([Program.builtin("keeper", data_pages=3, args=(5, 1))]))
    m.run(until=lambda m: "round 1," in m.console.text(1))
    blob = m.save_state().to_bytes()
    nonces = []
    for _ in range(2):
        r = Machine.restore(MachineState.from_bytes(blob))
        r.seal_for_export()
        nonces.append({p.vaddr: p.nonce for p in r.protection.process(1).pages})
    assert all(nonces[0][v] != nonces[1][v] for v in nonces[0])


def test_a_halted_probe_that_faults_is_a_guest_error_not_a_vmm_exception():
    from minivmm.errors import KernelPanic
    hook = "syscall_hook:\n    cli\n    hlt\n    mov eax, [0xF0000000]\n    ret\n"
    m = Machine(build_image([Program.builtin("hello")],
                            kernel_source=kernel_text().replace('.include "hook_none.s"', hook)))
    with pytest.raises(KernelPanic):
        m.run(max_ticks=200)
