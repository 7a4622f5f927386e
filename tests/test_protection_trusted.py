"""Trusted output (issue 9 item 8): HC_TRUSTED_WRITE is shown by the VMM with
the process's identity; the kernel can neither forge it nor drop it."""

import subprocess
import sys

from guests.build import Program, build_image, kernel_text
from guesthelp import prog
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
