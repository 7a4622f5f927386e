"""Kernel entries and returns of protected processes, at their edges (issue 19:
the prot_regs mutants that the register tests left alive).  Hostile kernels
where one can attack; direct calls where the case is a VMM contract that no
guest can time (an interrupt between the kernel's iret and the first fetch)."""

import pytest

from guests.build import build_image, kernel_text
from guesthelp import prog
from minivmm import abi
from minivmm import events as ev
from minivmm.cpu import read_cpu
from minivmm.machine import Machine
from test_protection_attacks import keeper_under
from test_protection_registers import (ALL_SECRETS, FPU_SPY, FPU_VICTIM, MARKERS, TABLE, _frame,
                                       custom)

# ------------------------------------------- an unprotected process's entries
SPIN_PROTECTED = """
_start:
    call ulib_protect
spin:
    jmp spin
.include "_ulib.s"
"""
FAULTS_AT = """
_start:
    mov eax, [0x12345678]
spin:
    jmp spin
.include "_ulib.s"
"""


@pytest.mark.parametrize("protect", [0, 1])
def test_an_unprotected_process_faulting_beside_a_protected_one_is_reported_at_its_address(protect):
    # Once anything is protected every kernel entry goes through the VMM's
    # register protection; one from an unprotected process must reach the
    # kernel as it was (with CR2, which the fault sets, not the CPU's old one).
    sources = [prog("guarded", SPIN_PROTECTED if protect else FAULTS_AT.replace(
        "mov eax, [0x12345678]", "nop"), data_pages=1), prog("faulty", FAULTS_AT, data_pages=1)]
    m = Machine(build_image(sources))
    m.run(max_ticks=50)
    assert bool(m.protection.active) == bool(protect)
    assert m.exits == {2: 128 + abi.VEC_PF}
    assert "killed pid 2: vector 14 at eip 0x40001000 cr2 0x12345000" in m.console.text()


# ------------------------------------- a return refused for a descriptor change
# TABLE's descriptor change, and at the same return the kernel rewrites the
# saved edi (no system-call argument): one tamper, one violation, and the kernel is told of the refused
# fetch as a fetch (a read: P|U), not as a write.
TABLE_AND_EBX = TABLE.replace("dt_out:", "    mov dword ptr [esi+PROC_FRAME+0], 0x1234\ndt_out:")


def test_a_return_refused_for_a_descriptor_change_is_reported_once_as_a_read_fault():
    assert TABLE_AND_EBX != TABLE
    m, seen = keeper_under(TABLE_AND_EBX, protection=True)
    m.run(max_ticks=3000)
    violations = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    tampers = [e for e in seen if isinstance(e, ev.RegisterTamper)]
    [v] = violations
    assert "descriptors changed" in v.reason
    [t] = tampers                  # not again at the #PF entry that follows
    assert t.registers == ("edi",)
    assert m.exits[1] == 128 + abi.VEC_PF
    frame = _frame(m, 1)
    assert frame["vec"] == abi.VEC_PF and frame["err"] == 5
    assert not m.protection.procs[1].in_kernel


# ----------------------------------- a segment cache behind a selector with RPL 0
# The victim addresses its data through FS = 0x20 (the user data descriptor,
# requested privilege 0: allowed, DPL 3 >= CPL 3).  At its system call the
# kernel moves that descriptor's base by a page, loads FS from it and changes
# the table back before its iretd: the table looks honest, FS's cached base
# is one page off, and the victim reads its decoy instead of its secret.
FS_VICTIM = """
_start:
    mov ax, 0x20
    mov fs, ax
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    mov dword ptr [DATA_VADDR+0x1000], 0x5EC0
    mov dword ptr [DATA_VADDR+0x2000], 0xDEC0
    mov eax, SYS_GETPID
    int 0x80
    mov eax, fs:[DATA_VADDR+0x1000]
    cmp eax, 0x5EC0
    jne bad
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 5
    call ulib_exit
.include "_ulib.s"
"""
FS_HOOK = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 1
    jne fc_out
    mov dword ptr [gdt+0x20], 0x1000FFFF
    mov dword ptr [fc_armed], 1
fc_out:
    ret
fc_armed: .long 0
"""


def _load_fs_then_undo(src):
    old = "    mov ax, SEL_UDATA\n    mov ds, ax\n    mov es, ax\n    popad"
    assert src.count(old) == 1
    return src.replace(old, "    cmp dword ptr [fc_armed], 0\n    je fc_skip\n"
                            "    mov ax, 0x20\n    mov fs, ax\n"
                            "    mov dword ptr [gdt+0x20], 0x0000FFFF\n"
                            "    mov dword ptr [fc_armed], 0\nfc_skip:\n" + old)


@pytest.mark.parametrize("protect", [0, 1])
def test_a_stale_segment_cache_behind_a_selector_with_rpl_0_is_reloaded(protect):
    m = Machine(build_image([prog("fsvictim", FS_VICTIM, data_pages=3, args=(1, protect))],
                            kernel_source=_load_fs_then_undo(custom(FS_HOOK))))
    seen = []
    m.events.subscribe(seen.append, ev.IntegrityViolation)
    m.run(max_ticks=500)
    if not protect:
        assert m.exits == {1: 5}                   # the attack works on it
    else:
        assert m.exits == {1: 0} and not seen and bool(m.protection.view())


# --------------------------------------------------- the return inside the hook
def test_an_honest_return_is_restored_inside_the_fill_without_ending_the_slice():
    # The cheap path (module doc): only a redirected return is refused and
    # restored between slices.
    m = Machine(build_image([prog("once", ALL_SECRETS.replace(
        "spin:\n    jmp spin", "    mov eax, SYS_GETPID\n    int 0x80\n    mov eax, SYS_GETPID\n"
        "    int 0x80\n    xor eax, eax\n    call ulib_exit"), data_pages=1, args=(1, 1))])
    )
    verdicts = []
    real = m.protection._returned

    def returned(uc, proc, vaddr):
        verdicts.append(real(uc, proc, vaddr))
        return verdicts[-1]
    m.protection._returned = returned
    m.run(max_ticks=500)
    assert m.exits == {1: 0}
    assert len(verdicts) >= 2 and set(verdicts) == {None}, verdicts


# ------------------------------------------------------------- x87 registers
# FPU_VICTIM, spinning after its system call (so a run can stop there).
FPU_SPINNER = FPU_VICTIM.replace("    jne bad\n    xor eax, eax\n", "    jne bad\n    mov ecx, 300000\n"
                                 "wait:\n    dec ecx\n    jnz wait\n    xor eax, eax\n")


def test_saved_x87_registers_are_dropped_once_given_back():
    # prot_state: kept "while the kernel runs" -- not in a state file saved later.
    assert FPU_SPINNER != FPU_VICTIM
    m = Machine(build_image([prog("fpu", FPU_SPINNER, data_pages=1, args=(1, 1))],
                            kernel_source=custom(FPU_SPY)))
    proc = lambda: m.protection.procs.get(1)           # noqa: E731
    m.run(until=lambda m: proc() is not None and proc().fpu is not None)
    m.run(until=lambda m: not proc().in_kernel)
    assert not proc().exited and read_cpu(m._uc).cpl == 3
    assert proc().fpu is None
    m.run(max_ticks=500)
    assert m.exits == {1: 0}


# ------------------------------------- an interrupt before the first fetch
def _inside_a_system_call():
    m = Machine(build_image([prog("fpu", FPU_VICTIM, data_pages=1, args=(1, 1))],
                            kernel_source=custom(FPU_SPY)))
    m.run(until=lambda m: 1 in m.protection.procs and m.protection.procs[1].in_kernel)
    return m, m.protection.procs[1]


def test_a_return_settled_at_the_next_entry_still_reports_tampering():
    # The kernel irets with a changed ebx, and an interrupt comes before the
    # process's first fetch (a slice may end between them): the VMM settles
    # the return at that entry, and must still report the change.
    m, proc = _inside_a_system_call()
    tampers = []
    m.events.subscribe(tampers.append, ev.RegisterTamper)
    back = proc.shown.replace(ebx=0x1234)
    shown = m.protection.enter_kernel(back, abi.VEC_TIMER, False, uc=m._uc)
    [t] = tampers
    assert t.registers == ("ebx",)
    assert shown.ebx == 0 and proc.in_kernel


def test_a_kernel_entry_flushes_the_tlb():
    # The return is found as the first ring-3 fill after the entry (module doc).
    m, proc = _inside_a_system_call()
    flushes = []
    m.protection._flush = lambda: flushes.append(1)
    cpu = proc.shown
    m.protection.enter_kernel(cpu, abi.VEC_TIMER, False, uc=m._uc)
    assert flushes


def test_an_exited_process_leaves_no_x87_register_in_the_vmm():
    # It exits from inside a system call: the x87 registers saved at that
    # entry are never given back, and must go with its saved general
    # registers and its key -- not stay in every later state file.
    m = Machine(build_image([prog("fpu", FPU_VICTIM, data_pages=1, args=(1, 1))],
                            kernel_source=custom(FPU_SPY)))
    m.run(max_ticks=500)
    assert m.exits == {1: 0}
    proc = m.protection.procs[1]
    assert proc.exited and proc.saved is None
    assert proc.fpu is None
    assert all(p["fpu"] is None for p in m.protection.save().processes)


# ------------------------------------------ the same through the kernel's LDT
# A kernel with an LDT (entry 0: flat user data, DPL 3), which it installs at
# the victim's first system call.  The victim then addresses through FS = 4:
# LDT entry 0, requested privilege 0 (the lowest TI=1 selector).  At its 2nd
# call the kernel moves that entry's base by a page, loads FS from it, and
# puts it back before its iretd.
LDT_VICTIM = FS_VICTIM.replace("_start:\n    mov ax, 0x20\n", "_start:\n    mov eax, SYS_GETPID\n"
                               "    int 0x80\n    mov ax, 4\n")
LDT_HOOK = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 1
    jne lh_2
    push ebx
    push ecx
    mov eax, ldt_table
    mov ebx, eax
    shl ebx, 16
    or ebx, 7                       ; limit: one entry
    mov [gdt_ldt], ebx
    mov ebx, eax
    and ebx, 0xFF000000
    mov ecx, eax
    shr ecx, 16
    and ecx, 0xFF
    or ebx, ecx
    or ebx, 0x8200                  ; present, DPL0, type 2 (LDT)
    mov [gdt_ldt+4], ebx
    mov ax, 0x30
    lldt ax
    pop ecx
    pop ebx
    ret
lh_2:
    cmp eax, 2
    jne lh_out
    mov dword ptr [ldt_table], 0x1000FFFF
    mov dword ptr [lh_armed], 1
lh_out:
    ret
lh_armed: .long 0
ldt_table: .long 0x0000FFFF, 0x00CFF200
"""


def _ldt_kernel(src):
    for old, new in [
            ("    .long 0, 0                      ; 0x28 TSS, filled at boot\n",
             "    .long 0, 0                      ; 0x28 TSS, filled at boot\n"
             "gdt_ldt:\n    .long 0, 0\n"),
            ("    .word 0x2f                      ; 6 descriptors * 8 - 1",
             "    .word 0x37"),
            ("    mov ax, SEL_UDATA\n    mov ds, ax\n    mov es, ax\n    popad",
             "    cmp dword ptr [lh_armed], 0\n    je lh_skip\n"
             "    mov ax, 4\n    mov fs, ax\n"
             "    mov dword ptr [ldt_table], 0x0000FFFF\n"
             "    mov dword ptr [lh_armed], 0\nlh_skip:\n"
             "    mov ax, SEL_UDATA\n    mov ds, ax\n    mov es, ax\n    popad")]:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    return src


@pytest.mark.parametrize("protect", [0, 1])
def test_a_stale_segment_cache_behind_an_ldt_selector_is_reloaded(protect):
    assert LDT_VICTIM != FS_VICTIM
    m = Machine(build_image([prog("ldtvictim", LDT_VICTIM, data_pages=3, args=(1, protect))],
                            kernel_source=_ldt_kernel(custom(LDT_HOOK))))
    seen = []
    m.events.subscribe(seen.append, ev.IntegrityViolation)
    m.run(max_ticks=500)
    assert read_cpu(m._uc).gdt_limit == 0x37
    if not protect:
        assert m.exits == {1: 5}                   # the attack works on it
    else:
        assert m.exits == {1: 0} and not seen and bool(m.protection.view())


# --------------------------------------------------------- CR0 bits pinned
# At the keeper's 2nd system call the kernel flips CR0.WP (whether the kernel
# may write through read-only PTEs: how addresses translate) and returns.
WP_FLIP = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne wp_out
    mov eax, cr0
    xor eax, 0x10000
    mov cr0, eax
wp_out:
    ret
"""


@pytest.mark.parametrize("protection", [False, True])
def test_a_return_with_cr0_wp_flipped_stops_the_process(protection):
    m, seen = keeper_under(WP_FLIP, protection=protection)
    m.run(max_ticks=3000)
    violations = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    if not protection:
        assert m.exits == {1: 0} and not violations      # nothing the process itself sees
    else:
        [v] = violations
        assert "descriptors changed" in v.reason and "CR0 " in v.reason
        assert m.exits[1] == 128 + abi.VEC_PF


# ------------------------------------------- the pinned record, entry by entry
# prot_pinned.snapshot against the toy kernel's GDT (limit 0x2f: the null
# entry, 0x08 kernel code, 0x10 kernel data, 0x18 user code, 0x20 user data,
# 0x28 TSS) and the LDT kernel's one-entry LDT (limit 7).
from minivmm import prot_pinned  # noqa: E402

DESC = {0x08: "ffff0000009acf00", 0x10: "ffff00000092cf00", 0x18: "ffff000000facf00",
        0x20: "ffff000000f2cf00"}


def _snap(m, **sels):
    cpu = read_cpu(m._uc)
    touched = []
    selectors = {"cs": 0x1B, "ss": 0x23, "ds": 0x23, "es": 0x23, "fs": 0, "gs": 0, **sels}
    snap = prot_pinned.snapshot(m._uc, m.ram, touched.append, selectors, cpu.cr3)
    assert touched                 # every table read is shown to the protection
    return snap["segments"]


def _booted():
    m = Machine(build_image([prog("secrets", ALL_SECRETS, data_pages=1, args=(0, 1))]))
    m.run(until=lambda m: m.protection.procs and read_cpu(m._uc).cpl == 3, max_ticks=200)
    return m


def test_the_pinned_record_holds_each_descriptor_with_the_accessed_bit_masked():
    m = _booted()
    gdt = read_cpu(m._uc).gdt_base
    # the CPU sets the accessed bit of 0x10 on a load; set it on 0x20 too
    raw = m.read_virtual(read_cpu(m._uc).cr3, gdt + 0x25, 1, user=False)[0]
    m.ram.write(gdt + 0x25, bytes([raw | 1]))     # the kernel is identity mapped
    assert m.read_virtual(read_cpu(m._uc).cr3, gdt + 0x25, 1, user=False)[0] & 1
    for sels in ({}, {"ds": 0x10, "es": 0x08, "fs": 0x2B, "gs": 0x18},
                 {"cs": 0x23, "ds": 0x23, "es": 0x23, "fs": 0x23, "gs": 0x23},
                 {"cs": 0x2B, "ss": 0x2B, "ds": 0x2B, "es": 0x2B}):
        segs = _snap(m, **sels)
        for name, (sel, desc) in segs.items():
            want = {"cs": 0x1B, "ss": 0x23, "ds": 0x23, "es": 0x23, "fs": 0, "gs": 0, **sels}[name]
            assert sel == want
            if want & ~7 in DESC:
                assert desc == DESC[want & ~7], (name, hex(want), desc)
            elif want & ~7 == 0x28:
                assert len(desc) == 16 and desc[10:12] in ("88", "8a"), desc   # the TSS (accessed = busy bit masked)
            else:
                assert desc == prot_pinned.NULL


def test_null_and_out_of_table_selectors_are_recorded_as_such():
    m = _booted()
    for null in (0, 1, 2, 3):
        assert _snap(m, fs=null)["fs"] == [null, prot_pinned.NULL]
    for outside in (0x30, 0x33, 0x38, 0xFFF8):
        assert _snap(m, gs=outside)["gs"] == [outside, prot_pinned.OUTSIDE]
    assert _snap(m, gs=0x28)["gs"][1] != prot_pinned.OUTSIDE   # the last entry: 0x28 + 7 = limit
    assert _snap(m, gs=0x2B)["gs"][1] != prot_pinned.OUTSIDE
    assert _snap(m, gs=0x2F)["gs"] == [0x2F, prot_pinned.OUTSIDE]    # TI=1: no LDT here


def test_an_ldt_selector_is_recorded_from_the_ldt():
    m = Machine(build_image([prog("ldtvictim", LDT_VICTIM, data_pages=3, args=(1, 1))],
                            kernel_source=_ldt_kernel(custom(LDT_HOOK))))
    m.run(until=lambda m: m.protection.procs and read_cpu(m._uc).cpl == 3, max_ticks=200)
    _, base, limit, _ = m._uc.reg_read(prot_pinned.UC_X86_REG_LDTR)
    assert limit == 7
    for sel in (4, 5, 6, 7):
        assert _snap(m, fs=sel)["fs"] == [sel, DESC[0x20]]
    assert _snap(m, fs=0xC)["fs"] == [0xC, prot_pinned.OUTSIDE]
    segs = _snap(m, fs=7, gs=0x2B)          # both tables in one record
    assert segs["fs"] == [7, DESC[0x20]] and segs["gs"][1] not in (prot_pinned.NULL,
                                                                    prot_pinned.OUTSIDE)


def test_a_table_is_read_exactly_over_the_entries_its_selectors_name():
    # A table at the start of a mapped page (below it: unmapped), or ending at
    # its end: reading a byte more either side would call it unmapped.  The
    # victim's one data page is at DATA_VADDR; the pages either side are not mapped.
    from unicorn.x86_const import UC_X86_REG_GDTR
    m = _booted()
    cr3 = read_cpu(m._uc).cr3
    for base in (abi.DATA_VADDR, abi.DATA_VADDR + 0x1000 - 0x30):
        m._uc.reg_write(UC_X86_REG_GDTR, (0, base, 0x2F, 0))
        for sels in ({}, {"ds": 0x08, "gs": 0x2B}, {"cs": 0x2B, "ss": 0x2B, "ds": 0x2B, "es": 0x2B}):
            for name, (sel, desc) in _snap(m, **sels).items():
                if sel & ~3:
                    raw = bytearray(m.read_virtual(cr3, base + (sel & ~7), 8, user=False))
                    raw[5] &= 0xFE
                    assert desc == raw.hex(), (hex(base), name, hex(sel), desc)
    m._uc.reg_write(UC_X86_REG_GDTR, (0, abi.DATA_VADDR + 0x1000 - 0x20, 0x2F, 0))
    segs = _snap(m, gs=0x2B)
    assert segs["gs"] == [0x2B, prot_pinned.UNMAPPED]          # the whole read is refused
    assert segs["cs"] == [0x1B, prot_pinned.UNMAPPED]


GOOD = {"cr0": 0x80010001, "segments": {"cs": [0x1B, DESC[0x18]], "ss": [0x23, DESC[0x20]],
                                       "ds": [0x23, DESC[0x20]], "es": [0x23, DESC[0x20]],
                                       "fs": [0, prot_pinned.NULL], "gs": [0xFFFF, prot_pinned.OUTSIDE]}}


def _bad(**change):
    import copy
    doc = copy.deepcopy(GOOD)
    for k, v in change.items():
        if k in doc:
            doc[k] = v
        else:
            doc["segments"][k] = v
    return doc


@pytest.mark.parametrize("doc", [
    _bad(cr0="0x80010001"), _bad(segments=[]), _bad(cr0="1", segments=GOOD["segments"]),
    {"cr0": 1, "segments": {n: v for n, v in GOOD["segments"].items() if n != "gs"}},
    {"cr0": 1, "segments": {**GOOD["segments"], "ldtr": [0, prot_pinned.NULL]}},
    _bad(fs=["0", prot_pinned.NULL]), _bad(fs=[-1, prot_pinned.NULL]),
    _bad(fs=[0x10000, prot_pinned.NULL]), _bad(fs=[0, 0]), _bad(fs=[0, "short"]),
    _bad(fs=[0x23, DESC[0x20] + "00"]), {"cr0": 1}, {**GOOD, "extra": 1}, [],
])
def test_a_pinned_record_from_a_state_file_is_checked(doc):
    with pytest.raises(ValueError):
        prot_pinned.check(doc)


def test_a_good_pinned_record_passes_its_check():
    assert prot_pinned.check(GOOD) == GOOD
    assert prot_pinned.check(_bad(gs=[0xFFFF, prot_pinned.UNMAPPED]))["segments"]["gs"][0] == 0xFFFF


# ------------------------------------------------ the x87/SSE fingerprint
def test_the_x87_fingerprint_is_found_and_sees_every_register_alone():
    # unicorn is pinned, so the experiment finds every register's bytes (else
    # every kernel entry would take the slow path); each register changed
    # alone, to any value, shows in the fingerprint and is saved.
    from unicorn import UC_ARCH_X86, UC_MODE_32, Uc

    from minivmm import prot_fpu
    assert prot_fpu._OFFSETS is not None and prot_fpu._SPANS
    assert len(prot_fpu.REGS) == len(prot_fpu.NAMES) == len(prot_fpu.DEFAULTS) == 24
    fresh = Uc(UC_ARCH_X86, UC_MODE_32)
    assert prot_fpu.save(fresh) is None      # (in_use is only a prefilter: "may differ")
    for i, reg in enumerate(prot_fpu.REGS):
        values = (((1, 0), (0, 1)) if reg in prot_fpu.FP else (1, 1 << 127) if reg in prot_fpu.XMM
                  else (1, 0x40))
        for value in values:
            uc = Uc(UC_ARCH_X86, UC_MODE_32)
            uc.reg_write(reg, value)
            assert prot_fpu.in_use(uc), (prot_fpu.NAMES[i], value)
            saved = prot_fpu.save(uc)
            assert saved is not None and saved[i] == uc.reg_read(reg)
            prot_fpu.scrub(uc)
            assert prot_fpu.save(uc) is None            # (in_use only "may differ")
            prot_fpu.load(uc, saved)
            assert uc.reg_read(reg) == saved[i]
