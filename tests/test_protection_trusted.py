"""Trusted output (issue 9 item 8): HC_TRUSTED_WRITE is shown by the VMM with
the process's identity; the kernel can neither forge it nor drop it."""

import subprocess
import sys

from guests.build import Program, build_image, kernel_text
from guesthelp import prog, started
from minivmm import abi
from minivmm import events as ev
from minivmm.machine import Machine


def keeper(hook=None, *, protect=1):
    kw = {"kernel_source": kernel_text().replace('.include "hook_none.s"', hook)} if hook else {}
    m = Machine(build_image([Program.builtin("keeper", data_pages=3, args=(5, protect))], **kw))
    out = []
    m.events.subscribe(out.append, ev.TrustedOutput)
    return m, out


def test_the_keeper_gives_its_verdicts_through_the_vmm():
    m, out = keeper()
    assert m.run(max_ticks=3000) == "shutdown"
    ident = m.protection.process(1).ident
    assert [(e.pid, e.ident, e.text) for e in out] == \
        [(1, ident, "secret intact")] * 5 + [(1, ident, "done: the secret was intact every round")]
    assert m.trusted_output == [(e.pid, e.ident, e.text) for e in out]


# Drops every byte the victim writes (its write() returns success, prints nothing).
DROP = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    test eax, eax
    jz dr_out
    cmp dword ptr [esi+PF_EAX], SYS_WRITE
    jne dr_out
    mov dword ptr [esi+PF_ECX], 0
dr_out:
    ret
"""


def test_a_kernel_that_drops_the_output_does_not_drop_trusted_output():
    m, out = keeper(DROP)
    assert m.run(max_ticks=3000) == "shutdown"
    assert m.console.text(1) == ""                      # everything through the kernel: gone
    assert [e.text for e in out][-1] == "done: the secret was intact every round" and len(out) == 6


# The kernel tries it itself, naming the victim's secret page, at every system call.
FORGE = r"""
syscall_hook:
    push esi
    mov eax, HC_TRUSTED_WRITE
    mov ebx, 0x40801000
    mov ecx, 4
    int 0x82
    mov [fg_result], eax
    pop esi
    ret
fg_result: .long 0
"""


def test_the_kernel_cannot_issue_trusted_output():
    m, out = keeper(FORGE)
    results = []
    m.events.subscribe(lambda e: results.append((e.pid, e.result))
                       if e.number == abi.HC_TRUSTED_WRITE else None, ev.Hypercall)
    assert m.run(max_ticks=3000) == "shutdown"
    kernel = [r for pid, r in results if pid == 0]
    assert kernel and set(kernel) == {-abi.EPERM}
    assert len(out) == 6 and all(e.pid == 1 for e in out)


def test_an_unprotected_process_cannot_issue_trusted_output():
    m, out = keeper(protect=0)
    assert m.run(max_ticks=3000) == "shutdown"
    assert out == [] and m.console.text(1).count("secret intact") == 5


ONLY_PROTECTED_PAGES = """
_start:
    call ulib_protect
    mov dword ptr [DATA_VADDR], 0x6b6f     ; "ok" in the shared page
    mov ebx, DATA_VADDR
    mov ecx, 2
    mov eax, HC_TRUSTED_WRITE
    int 0x82
    neg eax
    call ulib_putdec                       ; -EFAULT: the kernel may rewrite the shared page
    mov ebx, msg
    mov ecx, 2
    mov eax, HC_TRUSTED_WRITE
    int 0x82
    call ulib_putdec                       ; 2: from its own image
    mov ebx, msg
    mov ecx, TRUSTED_WRITE_MAX + 1
    mov eax, HC_TRUSTED_WRITE
    int 0x82
    neg eax
    call ulib_putdec                       ; -EINVAL: too long
    xor eax, eax
    call ulib_exit
msg: .ascii "hi"
.include "_ulib.s"
"""


def test_trusted_output_comes_only_from_the_processs_protected_pages():
    m = Machine(build_image([prog("tw", ONLY_PROTECTED_PAGES, data_pages=1)]))
    out = []
    m.events.subscribe(out.append, ev.TrustedOutput)
    assert m.run(max_ticks=500) == "shutdown"
    assert m.console.text(1) == f"{abi.EFAULT}2{abi.EINVAL}"
    assert [e.text for e in out] == ["hi"]


def test_the_cli_shows_trusted_output_on_the_vmms_own_stream():
    r = subprocess.run([sys.executable, "-m", "minivmm", "run", "attack-tamper", "--key-seed", "t"],
                       capture_output=True, text=True, timeout=600)
    assert "verified]" not in r.stdout                  # the guest's console cannot hold it
    assert "INTEGRITY VIOLATION" in r.stderr
    assert "verified] done" not in r.stderr             # the tampered keeper never says done
    r = subprocess.run([sys.executable, "-m", "minivmm", "run", "secret", "--key-seed", "t"],
                       capture_output=True, text=True, timeout=600)
    assert r.stderr.count("keeper #") >= 6 and "verified] done: the secret was intact" in r.stderr


# ------------------------------------------------------------------ trusted_read
# What HC_TRUSTED_WRITE reads, called with exactly the values the hypercall
# passes (Machine._trusted_write: the caller's CR3, ebx, ecx), against a
# kernel that edits the caller's page tables or RAM in between (issue 19:
# each check below had a one-line mutant no test noticed).
import struct                                                      # noqa: E402

import pytest                                                      # noqa: E402

from guests.asm import assemble                                    # noqa: E402
from guests.build import PROGRAMS_DIR, expand_includes             # noqa: E402

TWO_PAGES = """
_start:
    mov eax, SYS_YIELD
    int 0x80
    jmp _start
text: .space 8000, 0x41
"""


@pytest.fixture
def reader():
    """(machine, cr3, the image bytes as assembled): one protected process, stopped."""
    m, cr3 = started(prog("tr", TWO_PAGES, data_pages=2))
    code = assemble(expand_includes(TWO_PAGES, PROGRAMS_DIR), abi.IMAGE_VADDR).code
    code = bytearray(code.ljust(2 * abi.PAGE_SIZE, b"\0"))
    for i in range(0, len(code), 4):            # every word tells where it is
        struct.pack_into("<I", code, i, abi.IMAGE_VADDR + i)
    walk_frames = [_pte(m, cr3[1], abi.IMAGE_VADDR + k * abi.PAGE_SIZE)[1] >> 12 for k in (0, 1)]
    for k, f in enumerate(walk_frames):
        m.ram.write(f << 12, bytes(code[k * abi.PAGE_SIZE:(k + 1) * abi.PAGE_SIZE]))
    assert m.protection.protect(cr3[1], 1, "tr", abi.DATA_VADDR, 0) == 0
    return m, cr3[1], bytes(code)


def _pte(m, cr3, vaddr):
    """(address of the page table entry for vaddr, its value)."""
    pde = struct.unpack_from("<I", m.ram.view, cr3 + (vaddr >> 22) * 4)[0]
    at = (pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4
    return at, struct.unpack_from("<I", m.ram.view, at)[0]


def test_trusted_read_takes_up_to_the_limit_across_a_page_boundary(reader):
    m, cr3, code = reader
    read = m.protection.trusted_read
    start = abi.IMAGE_VADDR + abi.PAGE_SIZE - 100           # 100 bytes of one page, 156 of the next
    assert read(cr3, start, abi.TRUSTED_WRITE_MAX) == code[abi.PAGE_SIZE - 100:abi.PAGE_SIZE + 156]
    assert read(cr3, start + 2, 1) == code[abi.PAGE_SIZE - 98:abi.PAGE_SIZE - 97]
    assert read(cr3, abi.IMAGE_VADDR + 0x1005, 7) == code[0x1005:0x100C]
    assert read(cr3, start, 0) == b""
    assert read(cr3, start, abi.TRUSTED_WRITE_MAX + 1) == -abi.EINVAL


def test_trusted_read_bounds_the_buffer_inside_32_bits(reader):
    m, cr3, _ = reader
    read = m.protection.trusted_read
    assert read(cr3, 0xFFFFFFFF - 4, 4) == -abi.EFAULT      # the last 4 bytes: valid, not its page
    assert read(cr3, 0xFFFFFFFF - 3, 4) == -abi.EINVAL      # wraps past 4 GiB
    assert read(cr3, 0, 4) == -abi.EFAULT
    assert read(cr3, -4, 4) == -abi.EINVAL and read(cr3, abi.IMAGE_VADDR, -1) == -abi.EINVAL


def test_trusted_read_of_a_cloaked_page_verifies_it_and_leaves_it_cloaked(reader):
    m, cr3, code = reader
    assert m.protection.seal_all() >= 2
    meta = m.protection.procs[1].pages[abi.IMAGE_VADDR >> 12]
    sealed = bytes(m.ram.page(meta.ppn))
    assert m.protection.trusted_read(cr3, abi.IMAGE_VADDR + 8, 16) == code[8:24]
    assert meta.state == "cloaked" and bytes(m.ram.page(meta.ppn)) == sealed
    m.ram.view[(meta.ppn << 12) + 100] ^= 1                 # the kernel flips one bit
    assert m.protection.trusted_read(cr3, abi.IMAGE_VADDR + 8, 16) == -abi.EFAULT
    assert m.protection.procs[1].stopped == "MAC check failed (trusted write)"
    assert m.protection.trusted_read(cr3, abi.IMAGE_VADDR + abi.PAGE_SIZE, 4) == -abi.EPERM


def test_trusted_read_refuses_a_page_the_kernel_remapped_or_made_supervisor_only(reader):
    m, cr3, code = reader
    read = m.protection.trusted_read
    at, pte = _pte(m, cr3, abi.IMAGE_VADDR)
    struct.pack_into("<I", m.ram.view, at, pte & ~2)        # read-only: still its page, still readable
    assert read(cr3, abi.IMAGE_VADDR, 4) == code[:4]
    struct.pack_into("<I", m.ram.view, at, pte & ~4)        # supervisor-only: not the process's any more
    assert read(cr3, abi.IMAGE_VADDR, 4) == -abi.EFAULT
    struct.pack_into("<I", m.ram.view, at, pte & ~1)        # not present
    assert read(cr3, abi.IMAGE_VADDR, 4) == -abi.EFAULT
    _, other = _pte(m, cr3, abi.IMAGE_VADDR + abi.PAGE_SIZE)
    struct.pack_into("<I", m.ram.view, at, other)           # its other image page's frame
    assert read(cr3, abi.IMAGE_VADDR, 4) == -abi.EFAULT
    struct.pack_into("<I", m.ram.view, at, pte)
    assert read(cr3, abi.IMAGE_VADDR, 4) == code[:4]
    assert read(cr3, abi.DATA_VADDR, 4) == -abi.EFAULT      # the shared page
    assert read(cr3, abi.INFO_VADDR, 4) == -abi.EFAULT
    assert m.protection.procs[1].stopped is None


def test_trusted_read_is_only_for_a_live_protected_caller(reader):
    m, cr3, code = reader
    read = m.protection.trusted_read
    assert read(cr3 | 0x1F, abi.IMAGE_VADDR, 4) == code[:4]      # CR3's low bits ignored
    assert read(cr3 + abi.PAGE_SIZE, abi.IMAGE_VADDR, 4) == -abi.EPERM
    m.protection.process_exited(1)
    assert read(cr3, abi.IMAGE_VADDR, 4) == -abi.EPERM
