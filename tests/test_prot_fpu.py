"""The x87/MMX/SSE registers of a protected process (minivmm/prot_fpu.py) at
their edges (issue 19: the prot_fpu mutants the register tests left alive).
Hostile kernels where one can attack, hostile state files for what a restore
reads; the fingerprint's experiment on engines whose saved contexts are
altered on purpose, for the layouts the pinned unicorn does not have."""

import copy
import dataclasses
import itertools

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_32, Uc

from guests.build import build_image
from guesthelp import prog
from minivmm import prot_fpu
from minivmm.errors import StateError
from minivmm.machine import Machine
from minivmm.prot_state import ProtectedProcess, proc_from_dict, proc_to_dict
from test_protection_registers import FPU_SPY, FPU_VICTIM, custom

MXCSR_SECRET = 0x5EC30000      # in MXCSR's upper half: reserved bits, which unicorn's ldmxcsr takes


def _engine():
    return Uc(UC_ARCH_X86, UC_MODE_32)


# ------------------------------------------------------- hostile kernels
# At the victim's first system call the kernel turns SSE on (CR4.OSFXSR and
# OSXMMEXCPT: the toy kernel leaves it off, so ldmxcsr would be #UD); at each
# getpid it stores MXCSR where the test reads it.
MXCSR_SPY = """
syscall_hook:
    mov eax, cr4
    or eax, 0x600
    mov cr4, eax
    cmp dword ptr [esi+PF_EAX], SYS_GETPID
    jne ms_out
    stmxcsr dword ptr [fs_seen]
ms_out:
    ret
fs_seen: .long 0
"""
MXCSR_VICTIM = f"""
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    mov eax, SYS_GETPID
    int 0x80
    ldmxcsr dword ptr [secret]      ; nothing else differs from its reset value
    mov eax, SYS_GETPID
    int 0x80
    push 0
    stmxcsr dword ptr [esp]
    pop eax
    cmp eax, {MXCSR_SECRET:#x}
    jne bad
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 3
    call ulib_exit
secret: .long {MXCSR_SECRET:#x}
.include "_ulib.s"
"""


def _spied(victim, spy, protect):
    image = build_image([prog("fpu", victim, data_pages=1, args=(1, protect))],
                        kernel_source=custom(spy))
    m = Machine(image)
    m.run(max_ticks=500)
    assert m.exits == {1: 0}                       # its own registers came back intact
    return int.from_bytes(m.read_virtual(m.cpu().cr3, image.kernel_symbols["fs_seen"], 4, user=False),
                          "little")


@pytest.mark.parametrize("protect", [0, 1])
def test_the_kernel_sees_no_bit_of_a_protected_processs_mxcsr(protect):
    # The probe once wrote MXCSR with a 16-bit value, so its upper two bytes
    # were not in the fingerprint: a process whose only change was there kept
    # it at the kernel entry, and the kernel read it.
    seen = _spied(MXCSR_VICTIM, MXCSR_SPY, protect)
    assert seen == (0 if protect else MXCSR_SECRET)


# The victim enters the kernel once with nothing in its x87 registers (the
# VMM keeps the engine's context from that look), then loads its secrets.
FPU_LATE = FPU_VICTIM.replace("go:\n", "go:\n    mov eax, SYS_GETPID\n    int 0x80\n")


@pytest.mark.parametrize("protect", [0, 1])
def test_x87_registers_loaded_after_an_earlier_system_call_are_hidden_too(protect):
    assert FPU_LATE != FPU_VICTIM
    seen = _spied(FPU_LATE, FPU_SPY, protect)
    assert seen == (0 if protect else 0x5EC0F0F0)


# The victim's last x87 load is indexed by its secret (5); the kernel reads
# the x87 environment (fnstenv: FIP, FCS/FOP, FDP, FDS at bytes 12-27).
ENV_VICTIM = """
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    mov ecx, 5
    fild dword ptr [table+ecx*4]
    fstp st(0)
    mov eax, SYS_GETPID
    int 0x80
    xor eax, eax
    call ulib_exit
table: .long 0, 1, 2, 3, 4, 5, 6, 7
.include "_ulib.s"
"""
ENV_SPY = """
syscall_hook:
    cmp dword ptr [esi+PF_EAX], SYS_GETPID
    jne es_out
    fnstenv [fs_seen]
es_out:
    ret
fs_seen: .long 0, 0, 0, 0, 0, 0, 0
"""


@pytest.mark.parametrize("protect", [0, 1])
def test_the_kernel_learns_nothing_from_the_x87_environment_of_a_protected_process(protect):
    image = build_image([prog("fpu", ENV_VICTIM, data_pages=1, args=(1, protect))],
                        kernel_source=custom(ENV_SPY))
    m = Machine(image)
    m.run(max_ticks=500)
    assert m.exits == {1: 0}
    env = m.read_virtual(m.cpu().cr3, image.kernel_symbols["fs_seen"], 28, user=False)
    fip, fcs_fop, fdp, fds = (int.from_bytes(env[i:i + 4], "little") for i in (12, 16, 20, 24))
    if not protect:                                 # the spy works: FDP is table+20, past FIP
        assert fip and fds and fdp > fip
    else:
        assert (fip, fcs_fop, fdp, fds) == (0, 0, 0, 0)


# ------------------------------------------------------- the fingerprint
def test_every_bit_of_every_register_alone_shows_in_the_fingerprint():
    uc = _engine()
    assert not prot_fpu.in_use(uc)
    for name, reg, default in zip(prot_fpu.NAMES, prot_fpu.REGS, prot_fpu.DEFAULTS):
        if reg in prot_fpu.FP:
            values = [(1 << b, 0) for b in range(64)] + [(0, 1 << b) for b in range(16)]
        else:
            values = [1 << b for b in range(prot_fpu.TOPS[prot_fpu.REGS.index(reg)].bit_length() - 1)]
        for value in values:
            uc.reg_write(reg, value)
            assert uc.reg_read(reg) != default      # (the engine keeps every bit)
            assert prot_fpu.in_use(uc), (name, value)
            prot_fpu.scrub(uc)
            assert not prot_fpu.in_use(uc), (name, value)


def test_an_engine_that_never_touched_them_costs_no_register_read():
    # The fingerprint exists so that the common process pays nothing: no read
    # of the 24 registers, before or after a process used and scrubbed them.
    uc = _engine()

    def forbidden(_regs):
        raise AssertionError("the slow path was taken")
    real = uc.reg_read_batch
    uc.reg_read_batch = forbidden
    assert prot_fpu.save(uc) is None
    uc.reg_write(prot_fpu.REGS[0], (1, 1))
    uc.reg_read_batch = real
    saved = prot_fpu.save(uc)
    assert saved[0] == (1, 1)
    prot_fpu.scrub(uc)
    uc.reg_read_batch = forbidden
    assert prot_fpu.save(uc) is None


def test_without_a_fingerprint_every_entry_reads_the_registers(monkeypatch):
    # An engine build whose experiment failed (``_SPANS`` None): "may differ"
    # is always yes, and save() still finds a register a process changed.
    monkeypatch.setattr(prot_fpu, "_SPANS", None)
    uc = _engine()
    assert prot_fpu.in_use(uc) is True
    assert prot_fpu.save(uc) is None               # (reset values: nothing to hide)
    uc.reg_write(prot_fpu.REGS[-1], 0x40)
    assert prot_fpu.save(uc)[-1] == 0x40


def _probe_seeing(monkeypatch, change):
    """The experiment on an engine whose k-th saved context reads as
    change(k, bytearray of the real one)."""
    real, count = prot_fpu._raw, itertools.count()
    monkeypatch.setattr(prot_fpu, "_raw", lambda ctx: bytes(change(next(count), bytearray(real(ctx)))))
    try:
        return prot_fpu._probe()
    finally:
        monkeypatch.undo()


def _own_bytes(reg):
    uc = _engine()
    before = prot_fpu._fingerprint(uc)
    uc.reg_write(reg, (0x8123456789ABCDEF, 0x7ABC) if reg in prot_fpu.FP
                 else (1 << 128) - 1 - 0x5A5A if reg in prot_fpu.XMM else 0x1A3D1A3D)
    after = prot_fpu._fingerprint(uc)
    return [o for o, a, b in zip(prot_fpu._OFFSETS, before, after) if a != b]


def test_the_experiment_on_this_engine_is_repeatable(monkeypatch):
    assert _probe_seeing(monkeypatch, lambda k, raw: raw) == (prot_fpu.DEFAULTS, prot_fpu._OFFSETS)


def test_the_contexts_header_is_never_taken_for_a_register(monkeypatch):
    # A saved context starts with unicorn's header (a heap pointer, padding
    # left as malloc gave it): a byte of it that differs in one save only
    # must not join the fingerprint.
    size = _engine().context_save().size
    header = size - int.from_bytes(prot_fpu._raw(_engine().context_save())[:8], "little")
    assert 0 < header < min(prot_fpu._OFFSETS)

    def garbage_once(k, raw):
        if k == 5:
            raw[header - 3] ^= 0xFF
        return raw
    assert _probe_seeing(monkeypatch, garbage_once) == (prot_fpu.DEFAULTS, prot_fpu._OFFSETS)


@pytest.mark.parametrize("name, wide", [("st0", 10), ("xmm3", 16), ("fpsw", 2), ("mxcsr", 4), ("fpcw", 2),
                                        ("fip", 4), ("fcs", 2), ("fdp", 4), ("fds", 2), ("fop", 2)])
def test_a_register_seen_in_fewer_bytes_than_it_is_wide_disables_the_fingerprint(monkeypatch, name,
                                                                                wide):
    # Another engine build might keep part of a register where the experiment
    # cannot see it (here: bytes that never change): a change there would not
    # show, so the fingerprint is not used and every entry reads the registers.
    reg = prot_fpu.REGS[prot_fpu.NAMES.index(name)]
    own = _own_bytes(reg)
    assert len(own) >= wide

    def hiding(hidden):
        def change(_k, raw):
            for i in hidden:
                raw[i] = 0
            return raw
        return change
    kept = _probe_seeing(monkeypatch, hiding(own[wide:]))             # exactly its width left
    assert kept == (prot_fpu.DEFAULTS, [o for o in prot_fpu._OFFSETS if o not in own[wide:]])
    assert _probe_seeing(monkeypatch, hiding(own[wide - 1:])) == (prot_fpu.DEFAULTS, None)


def test_spans_are_the_contiguous_runs_of_the_offsets():
    assert prot_fpu._spans([]) == []
    assert prot_fpu._spans([7]) == [(7, 8)]
    assert prot_fpu._spans([3, 4, 5, 9, 11, 12]) == [(3, 6), (9, 10), (11, 13)]


# ----------------------------------------------------- hostile state files
MAXED = ([[(1 << 64) - 1, 0xFFFF]] * 8 + [(1 << 128) - 1] * 8 + [0xFFFF, 0xFFFFFFFF]
         + [0xFFFF, 0xFFFFFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFF, 0x7FF])       # FPCW FIP FCS FDP FDS FOP


def _with(i, v):
    doc = copy.deepcopy(MAXED)
    doc[i] = v
    return doc


def _record(fpu):
    d = proc_to_dict(ProtectedProcess(pid=1, cr3=0x10000, name="p", ident=7, key_handle=1,
                                      measurement=bytes(32), shared_vaddr=0x40800000, pages={}))
    return dict(d, fpu=fpu)


def test_a_state_files_registers_are_restored_up_to_their_widths():
    back = proc_from_dict(_record(MAXED)).fpu
    assert back == tuple(tuple(v) if isinstance(v, list) else v for v in MAXED)
    assert proc_from_dict(_record(prot_fpu.to_json(prot_fpu.DEFAULTS))).fpu == prot_fpu.DEFAULTS
    assert proc_from_dict(_record(None)).fpu is None


ST0, XMM0, FPSW, MXCSR, FIP, FCS, FOP = 0, 8, 16, 17, 19, 20, 23
HOSTILE = [
    (MAXED[:18], "not a list of 24"), (MAXED[:-1], "not a list of 24"), (MAXED + [0], "not a list of 24"),
    ([], "not a list of 24"), (dict(enumerate(MAXED)), "not a list of 24"), ("x" * 24, "not a list of 24"),
    (_with(ST0, [1 << 64, 0]), "x87 register st0"), (_with(ST0, [0, 1 << 16]), "x87 register st0"),
    (_with(7, [-1, 0]), "x87 register st7"), (_with(ST0, [0, -1]), "x87 register st0"),
    (_with(ST0, [0, 0, 0]), "x87 register st0"), (_with(ST0, [0]), "x87 register st0"),
    (_with(ST0, 5), "x87 register st0"), (_with(ST0, ["1", 0]), "x87 register st0"),
    (_with(ST0, [0, "1"]), "x87 register st0"), (_with(ST0, [True, 0]), "x87 register st0"),
    (_with(ST0, [1.0, 0]), "x87 register st0"), (_with(ST0, {"0": 0, "1": 0}), "x87 register st0"),
    (_with(XMM0, 1 << 128), "SSE register xmm0"), (_with(15, -1), "SSE register xmm7"),
    (_with(XMM0, "5"), "SSE register xmm0"), (_with(XMM0, True), "SSE register xmm0"),
    (_with(XMM0, [1, 2]), "SSE register xmm0"), (_with(XMM0, None), "SSE register xmm0"),
    (_with(FPSW, 0x10000), "SSE register fpsw"), (_with(MXCSR, 1 << 32), "SSE register mxcsr"),
    (_with(MXCSR, 1 << 128), "SSE register mxcsr"), (_with(FIP, 1 << 32), "SSE register fip"),
    (_with(FCS, 0x10000), "SSE register fcs"), (_with(FOP, 0x800), "SSE register fop"),
]


@pytest.mark.parametrize("fpu, why", HOSTILE, ids=[f"{w}-{i}" for i, (_, w) in enumerate(HOSTILE)])
def test_a_hostile_state_files_registers_are_refused(fpu, why):
    with pytest.raises(ValueError, match="protection state: bad saved .*" + why):
        proc_from_dict(_record(fpu))


def test_a_machine_is_not_restored_from_a_state_file_with_a_register_wider_than_itself():
    # Unicorn would take MXCSR = 2**32 + x as x: what runs would not be what
    # the file says.  The whole restore is refused.
    m = Machine(build_image([prog("fpu", FPU_VICTIM, data_pages=1, args=(1, 1))],
                            kernel_source=custom(FPU_SPY)))
    m.run(until=lambda m: 1 in m.protection.procs and m.protection.procs[1].fpu is not None)
    st = m.save_state()
    assert Machine.restore(st).protection.procs[1].fpu == m.protection.procs[1].fpu
    [proc] = copy.deepcopy(st.protection.processes)
    proc["fpu"][MXCSR] += 1 << 32
    bad = dataclasses.replace(st, protection=dataclasses.replace(st.protection, processes=(proc,)))
    with pytest.raises(StateError, match="protection metadata: .*bad saved SSE register mxcsr"):
        Machine.restore(bad)
