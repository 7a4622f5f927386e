"""Process protection: cloaking, register protection, hostile kernels, metadata."""

import dataclasses

import pytest

from guests.build import HOSTILE_KERNELS, Program, build_image, kernel_text
from guests.catalog import get_guest
from guesthelp import prog
from minivmm import abi, events as ev
from minivmm.machine import Machine
from minivmm.protection import CLOAKED, PLAINTEXT, ProtectionState
from minivmm.state import MachineState

P = Program.builtin
SECRET = b"swordfish: launch code 4-8-15-16"
SECRET_PAGE = 0x40801000


def lab(kernel, protection=True, **kw):
    image = get_guest(f"attack-{kernel}").build()
    m = Machine(image, protection=protection, **kw)
    seen = []
    m.events.subscribe(seen.append, ev.IntegrityViolation, ev.RegisterTamper, ev.PageCloaked,
                       ev.PageUncloaked, ev.ProcessProtected)
    assert m.run(max_ticks=2000) == "shutdown"
    return m, seen


def of(seen, cls):
    return [e for e in seen if isinstance(e, cls)]


# ----------------------------------------------------------- the attack lab
def test_snoop_sees_the_secret_only_without_protection():
    m, seen = lab("snoop", protection=False)
    assert f'snooped the secret page: "{SECRET.decode()}"' in m.console.text(0)
    assert "protection refused" in m.console.text(1)
    assert m.exits == {1: 0, 2: 0}

    m, seen = lab("snoop")
    kernel = m.console.text(0)
    assert "snooped the secret page" in kernel and "swordfish" not in kernel
    assert m.console.text(1).count("secret intact") == 5 and m.exits == {1: 0, 2: 0}
    cloaks = [e for e in of(seen, ev.PageCloaked) if e.vaddr == SECRET_PAGE]
    assert cloaks and cloaks[0].reason == "kernel access"
    assert any(e.vaddr == SECRET_PAGE for e in of(seen, ev.PageUncloaked))
    assert not of(seen, ev.IntegrityViolation)


def test_tamper_changes_the_secret_without_protection_and_is_caught_with_it():
    m, _ = lab("tamper", protection=False)
    assert "keeper: SECRET CHANGED" in m.console.text(1)
    assert m.exits == {1: 1, 2: 0}

    m, seen = lab("tamper")
    [v] = of(seen, ev.IntegrityViolation)
    assert (v.pid, v.name, v.vaddr) == (1, "keeper", SECRET_PAGE)
    assert "MAC check failed" in v.reason
    assert "SECRET CHANGED" not in m.console.text(1)       # it never ran on bad data
    assert m.exits == {1: 128 + abi.VEC_PF, 2: 0}           # only the victim stopped
    assert m.console.text(2).splitlines()[-1] == "counter 8"
    assert m.protection.process(1).stopped == v.reason


def test_register_tampering_works_without_protection_and_is_undone_with_it():
    m, _ = lab("regs", protection=False)
    assert "keeper: round 1001, secret intact" in m.console.text(1)

    m, seen = lab("regs")
    [t] = of(seen, ev.RegisterTamper)
    assert t.pid == 1 and t.registers == ("edi",) and "0x3e8" in t.detail
    assert [ln for ln in m.console.text(1).splitlines() if "round" in ln] == \
        [f"keeper: round {i}, secret intact" for i in range(1, 6)]
    assert m.exits == {1: 0, 2: 0}


def test_swapping_pages_is_caught():
    m, _ = lab("swap", protection=False)
    assert "keeper: SECRET CHANGED" in m.console.text(1)

    m, seen = lab("swap")
    [v] = of(seen, ev.IntegrityViolation)
    assert v.vaddr == SECRET_PAGE and "remapped" in v.reason and "0x40802000" in v.reason
    assert m.exits == {1: 128 + abi.VEC_PF, 2: 0}


def test_cli_reports_violations_and_has_a_no_protection_switch():
    import subprocess
    import sys
    run = [sys.executable, "-m", "minivmm", "run", "attack-tamper"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "INTEGRITY VIOLATION: pid 1 (keeper) page 0x40801000" in out.stderr
    out = subprocess.run(run + ["--no-protection"], capture_output=True, text=True, timeout=120)
    assert "SECRET CHANGED" in out.stdout and "INTEGRITY" not in out.stderr


# -------------------------------------------------- invisible to the owner
def test_a_protected_counter_prints_what_an_unprotected_one_does():
    def run(protect):
        m = Machine(build_image([P("counter", data_pages=1, args=(25, 20_000, protect)),
                                 P("counter", args=(25, 30_000), as_name="other")]))
        assert m.run(max_ticks=5000) == "shutdown"
        return m
    plain, protected = run(0), run(1)
    assert protected.console.text(1) == plain.console.text(1) == \
        "".join(f"counter {i}\n" for i in range(1, 26))
    assert protected.protection.process(1).pages and not plain.protection.view()
    assert protected.exits == plain.exits == {1: 0, 2: 0}


def test_vmm_readers_never_see_the_plaintext():
    # The VMM's own readers are "anyone else" too.  (The guest kernel's own
    # scan of RAM is in test_protection_attacks.py.)
    m = Machine(get_guest("secret").build())
    m.run(until=lambda m: m.protection.view() and "round 1," in m.console.text(1))
    assert SECRET in bytes(m.ram.view)      # the owner runs on plaintext: the scan can fail
    scans = 0
    while m.halted is None and scans < 12:
        m.step()
        cpu = m.cpu()
        if cpu.cpl != 0 or not cpu.cr0 & (1 << 31):
            continue
        # Everything the kernel can reach: its identity map of RAM.
        view = m.read_virtual(cpu.cr3, 0x1000, (16 << 20) - 0x1000, user=False)
        assert SECRET not in view
        assert SECRET not in bytes(m.ram.view)      # and nothing else holds it now
        scans += 1
    assert scans == 12
    assert m.run(max_ticks=2000) == "shutdown"
    assert m.console.text(1).count("secret intact") == 5 and m.exits[1] == 0


def test_versions_increase_on_every_recloak_and_metadata_is_exposed():
    m = Machine(get_guest("secret").build())
    versions = []
    m.events.subscribe(lambda e: versions.append(e.version) if e.vaddr == SECRET_PAGE else None,
                       ev.PageCloaked)
    m.run(until=lambda m: "round 1," in m.console.text(1))
    for _ in range(4):
        m.read_process(1, SECRET_PAGE, 16)              # a VMM reader: cloaks
        page = m.protection.process(1).page(SECRET_PAGE)
        assert page.state == CLOAKED and len(page.mac) == 32 and len(page.nonce) == 24
        m.run(until=lambda m: m.protection.process(1).page(SECRET_PAGE).state == PLAINTEXT,
              max_ticks=50)                             # the owner touches it again
    assert len(versions) >= 4 and versions == sorted(set(versions))
    p = m.protection.process(1)
    assert p.name == "keeper" and len(p.measurement) == 64 and p.key_handle >= 1
    assert p.shared_vaddr == abi.DATA_VADDR
    assert {pg.vaddr for pg in p.pages} >= {abi.IMAGE_VADDR, SECRET_PAGE, SECRET_PAGE + 0x1000}
    assert abi.DATA_VADDR not in {pg.vaddr for pg in p.pages}          # the shared page
    assert abi.INFO_VADDR not in {pg.vaddr for pg in p.pages}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.pages[0].version = 0                          # read-only view


def test_seal_for_export_cloaks_everything_and_the_owner_carries_on():
    m = Machine(get_guest("secret").build())
    m.run(until=lambda m: "round 2," in m.console.text(1))
    n = m.seal_for_export()
    assert n > 0 and SECRET not in bytes(m.ram.view)
    assert all(pg.state == CLOAKED for p in m.protection.view() for pg in p.pages)
    assert m.seal_for_export() == 0
    assert m.run(max_ticks=2000) == "shutdown" and m.exits == {1: 0, 2: 0}


# ------------------------------------------------------------ save/restore
@pytest.mark.parametrize("sealed", [True, False])
def test_save_restore_keeps_processes_protected_and_running(sealed):
    whole = Machine(get_guest("secret").build(), key_seed=b"t")
    whole.run(max_ticks=5000)

    m = Machine(get_guest("secret").build(), key_seed=b"t")
    # Stop while the keeper is inside a system call: its real registers are
    # in the metadata, the kernel holds scrubbed ones.
    m.run(until=lambda m: "round 2," in m.console.text(1) and m.protection.procs[1].in_kernel)
    if sealed:
        m.seal_for_export()               # every page cloaked: the keys must survive
    else:
        assert any(pg.state == PLAINTEXT for pg in m.protection.process(1).pages)
    st = MachineState.from_bytes(m.save_state().to_bytes())
    assert st.protection is not None and len(st.protection.processes) == 2
    r = Machine.restore(st)
    assert r.protection.view() == m.protection.view()
    ctx = r.protection.process(1).saved_context
    assert r.protection.process(1).in_kernel and (ctx.eax, ctx.edi) == (abi.SYS_SLEEP, 3)
    if sealed:
        assert SECRET not in bytes(r.ram.view)
    assert r.run(max_ticks=5000) == "shutdown"
    assert r.console.text() == whole.console.text()
    assert r.exits == whole.exits == {1: 0, 2: 0}
    assert all(not p.stopped for p in r.protection.view())


def test_protection_state_round_trip_and_bad_input():
    m = Machine(get_guest("secret").build())
    m.run(until=lambda m: "round 1," in m.console.text(1))
    st = m.protection.save()
    again = ProtectionState.from_dict(st.to_dict())
    assert again == st
    bad = st.to_dict()
    bad["version"] = 9
    with pytest.raises(ValueError, match="version"):
        ProtectionState.from_dict(bad)
    bad = st.to_dict()
    bad["keys"] = {"1": "AAAA"}
    with pytest.raises(ValueError, match="key"):
        ProtectionState.from_dict(bad)
    bad = st.to_dict()
    bad["processes"][0]["pages"][0][2] = "bogus"
    r = Machine(get_guest("secret").build())
    with pytest.raises(ValueError, match="page state"):
        r.protection.restore(ProtectionState.from_dict(bad))


def test_same_key_seed_same_ciphertext_for_reproducible_labs():
    a, _ = lab("snoop", key_seed=b"lab-1")
    b, _ = lab("snoop", key_seed=b"lab-1")
    c, _ = lab("snoop")
    assert a.console.text() == b.console.text()
    assert a.console.text(0) != c.console.text(0)


# --------------------------------------------------------------- bad input
PROTECT_CASES = """
_start:
    mov esi, cases
next:
    mov ebx, [esi]
    mov ecx, [esi+4]
    cmp ebx, 0xFFFFFFFF
    je done
    mov eax, HC_PROTECT
    int 0x82
    add esi, 8
    jmp next
done:
    xor eax, eax
    call ulib_exit
cases:
    .long 0x40800004, 0            ; not page-aligned
    .long 0x40000000, 0            ; the info page
    .long 0x50000000, 0            ; unmapped
    .long 0x40800000, 1            ; unknown flags
    .long 0x40800000, 0            ; good
    .long 0x40800000, 0            ; again
    .long 0xFFFFFFFF, 0
.include "_ulib.s"
"""


def hc_results(m):
    out = []
    m.events.subscribe(lambda e: out.append(e.result) if e.number == abi.HC_PROTECT else None,
                       ev.Hypercall)
    return out


def test_bad_protect_requests_get_documented_errors():
    m = Machine(build_image([prog("cases", PROTECT_CASES, data_pages=1), P("hello")]))
    results = hc_results(m)
    assert m.run(max_ticks=500) == "shutdown"
    assert results == [-abi.EINVAL] * 4 + [0, -abi.EEXIST]
    assert m.exits == {1: 0, 2: 0}

    off = Machine(build_image([prog("cases", PROTECT_CASES, data_pages=1)]), protection=False)
    results = hc_results(off)
    off.run(max_ticks=500)
    assert set(results) == {-abi.ENOSYS} and not off.protection.view()


def custom_kernel(hook: str) -> str:
    return kernel_text().replace('.include "hook_none.s"', hook)


def test_protect_from_the_kernel_is_refused():
    hook = """
syscall_hook:
    mov eax, HC_PROTECT
    mov ebx, 0x40800000
    xor ecx, ecx
    int 0x82
    ret
"""
    m = Machine(build_image([P("hello")], kernel_source=custom_kernel(hook)))
    results = hc_results(m)
    assert m.run(max_ticks=500) == "shutdown"
    assert results and set(results) == {-abi.EPERM}


# ------------------------------------------------------ register protection
REGS = """
_start:
    mov eax, 1
    call ulib_protect
    mov esi, 0x11111111
    mov edi, 0x22222222
    mov ebp, 0x33333333
    mov edx, 0x44444444            ; an argument register: the kernel may see it
    mov ebx, 0
    mov eax, SYS_SLEEP             ; ebx = 0 ticks: a plain yield
    int 0x80
    cmp esi, 0x11111111
    jne bad
    cmp edi, 0x22222222
    jne bad
    cmp ebp, 0x33333333
    jne bad
    cmp edx, 0x44444444
    jne bad
    mov esi, ok
    call ulib_puts
    xor eax, eax
    call ulib_exit
bad:
    mov esi, wrong
    call ulib_puts
    mov eax, 1
    call ulib_exit
ok:    .asciz "registers intact\\n"
wrong: .asciz "registers changed\\n"
.include "_ulib.s"
"""

# Record what the kernel sees of the caller's registers at its 1st system call,
# and send it back 2 bytes early (re-running `int 0x80`): a return-address attack.
SPY = """
syscall_hook:
    mov eax, [esi+PROC_PID]
    inc dword ptr [spy_n+eax*4]
    cmp dword ptr [spy_n+eax*4], 1
    jne spy_out
    mov eax, [esi+PROC_FRAME]          ; edi (FRAME_EDI = 0)
    mov [spy_seen], eax
    mov eax, [esi+PROC_FRAME+4]        ; esi
    mov [spy_seen+4], eax
    mov eax, [esi+PF_EDX]
    mov [spy_seen+8], eax
    cmp dword ptr [spy_mode], 0
    je spy_out
    sub dword ptr [esi+PROC_FRAME+40], 2   ; FRAME_EIP: back onto the int 0x80
spy_out:
    ret
spy_n:    .space 68, 0
spy_seen: .long 0, 0, 0
spy_mode: .long MODE
"""


@pytest.mark.parametrize("redirect", [0, 1])
def test_kernel_sees_scrubbed_registers_and_tampering_is_undone(redirect):
    source = custom_kernel(SPY.replace("MODE", str(redirect)))
    image = build_image([prog("regs", REGS, data_pages=1)], kernel_source=source)
    m = Machine(image)
    tampers = []
    m.events.subscribe(tampers.append, ev.RegisterTamper)
    assert m.run(max_ticks=500) == "shutdown"
    seen = m.read_virtual(m.cpu().cr3, image.kernel_symbols["spy_seen"], 12, user=False)
    edi, esi, edx = (int.from_bytes(seen[i:i + 4], "little") for i in (0, 4, 8))
    assert (edi, esi, edx) == (0, 0, 0x44444444)    # scrubbed, but the arguments are visible
    assert m.console.text(1) == "registers intact\n" and m.exits == {1: 0}
    if redirect:
        [t] = tampers
        assert t.registers == ("eip",)
    else:
        assert not tampers

    # Unprotected, the same kernel sees everything.
    plain = Machine(build_image([prog("regs", REGS.replace("call ulib_protect", "nop"),
                                      data_pages=1)], kernel_source=source))
    plain.run(max_ticks=500)
    seen = plain.read_virtual(plain.cpu().cr3, image.kernel_symbols["spy_seen"], 12, user=False)
    assert seen == bytes.fromhex("22222222" "11111111" "44444444")


def test_every_hostile_kernel_is_in_the_catalog():
    for k in HOSTILE_KERNELS:
        assert get_guest(f"attack-{k}").kernel == k


def test_protection_benchmark_runs_its_real_workloads():
    from minivmm.bench_protection import measure, report
    r = measure(repeat=1, syscalls=300, compute=20_000)
    assert r["cloak_us"] > 0 and r["uncloak_us"] > 0 and r["flush_tb_us"] > 0
    assert r["syscall_ratio"] > 0 and r["compute_ratio"] > 0
    assert "slowdown" in report(r)


def test_an_interrupt_before_the_first_fetch_settles_the_return_first():
    # If a slice ends between the kernel's iret and the process's first fetch,
    # the next kernel entry must not save the scrubbed registers as real ones.
    m = Machine(build_image([prog("regs", REGS, data_pages=1)]))
    m.run(until=lambda m: bool(m.protection.view()) and m.protection.procs[1].in_kernel)
    proc = m.protection.procs[1]
    real, shown = proc.saved, proc.shown
    assert real.esi == 0x11111111 and shown.esi == 0
    returned = shown.replace(eax=0)                  # what the kernel's iret leaves: scrubbed
    again = m.protection.enter_kernel(returned, abi.VEC_TIMER, False)
    assert proc.saved.esi == 0x11111111 and proc.saved.edi == 0x22222222
    assert proc.saved.eax == 0                       # the system-call result was kept
    assert again.esi == 0 and again.eax == 0         # and the kernel sees scrubbed ones again
    assert not proc.syscall


def test_cli_key_seed_makes_a_lab_run_reproducible():
    import subprocess
    import sys
    run = [sys.executable, "-m", "minivmm", "run", "attack-snoop", "--key-seed", "lab"]
    a, b = (subprocess.run(run, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert a.returncode == 0 and a.stdout == b.stdout and "snooped" in a.stdout


def test_protected_frames_are_the_frames_of_protected_pages():
    m = Machine(get_guest("secret").build())
    assert m.protected_frames() == []
    m.run(until=lambda m: "round 1," in m.console.text(1))
    frames = m.protected_frames()
    assert frames == sorted(pg.frame for p in m.protection.view() for pg in p.pages)


def test_a_copy_whose_keys_were_destroyed_stops_with_a_clear_error():
    """The secure protocol's source destroys every process key before COMMIT.
    A copy resumed anyway (the lab's double-resume) must stop with an error
    that says why at the first touch of a protected page, not crash with a
    bare KeyError (hostile-lab finding) and never run the process on."""
    from minivmm.errors import KeysDestroyed
    m = Machine(get_guest("secret").build())
    m.run(max_ticks=8)
    assert m.protection.procs, "the secret keeper is protected"
    m.protection.forget_keys()
    with pytest.raises(KeysDestroyed, match=r"pid \d+ \(.*\): its protection key was destroyed"):
        m.run(max_ticks=100_000)
    assert m.halted == "keys-destroyed"


def test_the_read_only_view_mirrors_the_metadata_field_by_field():
    """Every field of ProcessView/PageView against the live metadata it copies."""
    m = Machine(get_guest("secret").build())
    m.run(until=lambda m: "round 1," in m.console.text(1) and m.protection.procs[1].in_kernel)
    live, views = m.protection.procs[1], m.protection.view()
    assert [v.pid for v in views] == sorted(m.protection.procs)
    view = views[0]
    assert (view.pid, view.name, view.ident, view.measurement, view.key_handle, view.shared_vaddr) == (
        1, live.name, live.ident, live.measurement.hex(), live.key_handle, live.shared_vaddr)
    assert (view.in_kernel, view.saved_context, view.stopped, view.exited) == (True, live.saved, None, False)
    assert [p.vpn for p in view.pages] == sorted(live.pages)
    for p in view.pages:
        meta = live.pages[p.vpn]
        assert (p.owner, p.vaddr, p.frame, p.state, p.version, p.nonce, p.mac) == (
            1, p.vpn << 12, meta.ppn, meta.state, meta.version, meta.nonce.hex(), meta.tag.hex())
    assert view.page(SECRET_PAGE).vpn == SECRET_PAGE >> 12
    with pytest.raises(KeyError, match="0x1000 is not a protected page of pid 1"):
        view.page(0x1000)
    with pytest.raises(KeyError, match="pid 7 is not protected"):
        m.protection.process(7)
    m.run(until=lambda m: not m.protection.procs[1].in_kernel, max_ticks=50)
    assert m.protection.process(1).saved_context is None     # only while it is in the kernel
    assert m.run(max_ticks=3000) == "shutdown"
    assert m.protection.process(1).exited is True


def test_the_kernel_sees_a_stopped_process_fault_as_a_protection_violation():
    """After the integrity violation the keeper's next read of its page is refused
    with the #PF error code the hardware gives for a user read of a present page
    it may not use: P (1) | U (4), W clear -- not "not present", which a kernel
    would answer by paging something in and resuming it."""
    m = Machine(get_guest("attack-tamper").build())
    seen = []
    m.events.subscribe(seen.append, ev.Fault, ev.IntegrityViolation, ev.ProcessStart)
    assert m.run(max_ticks=2000) == "shutdown"
    [v] = of(seen, ev.IntegrityViolation)
    faults = [e for e in of(seen, ev.Fault) if e.pid == 1 and e.vector == 14]
    assert faults[0].seq == v.seq + 1
    assert (faults[0].error_code, faults[0].address) == (5, SECRET_PAGE)
    # A kernel that resumes it anyway: every later fill of it is refused the same way
    # (the fill the MMU would make for its read, then for a write, of that page).
    cr3 = next(e.cr3 for e in of(seen, ev.ProcessStart) if e.pid == 1)
    frame = m.protection.procs[1].pages[SECRET_PAGE >> 12].ppn << 12
    for write, code in ((False, 5), (True, 7)):
        assert m.protection.on_fill(m._uc, SECRET_PAGE, frame, True, write, False, cr3) == code


def test_the_view_shows_no_saved_context_once_the_kernel_returned():
    """A returned process keeps its last entry's registers in the VMM (they are
    overwritten at the next entry, never cleared at the return); the read-only
    view must not present them as the registers the kernel is holding."""
    m = Machine(get_guest("secret").build())
    for _ in range(200):            # the first entry the kernel returns from between two slices
        m.run(until=lambda m: any(p.in_kernel for p in m.protection.procs.values()), max_ticks=2000)
        [pid] = [p.pid for p in m.protection.procs.values() if p.in_kernel]
        assert m.protection.process(pid).saved_context is not None
        m.run(until=lambda m: not m.protection.procs[pid].in_kernel, max_ticks=2000)
        live = m.protection.procs[pid]
        if not live.exited:
            break
    assert not live.exited and live.saved is not None, "a return, not an exit"
    assert m.protection.process(pid).saved_context is None
