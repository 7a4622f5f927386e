"""Register protection: what the kernel sees at an entry, and what the process
gets back (issue 9 items 2 and 4; issue 19's register classes).

Every attack runs twice: unprotected, to show it works, and protected."""

import pytest

from guests.build import build_image, kernel_text
from guesthelp import prog
from minivmm import abi
from minivmm import events as ev
from minivmm.machine import Machine

MARKERS = {"eax": 0x5EC0000A, "ebx": 0x5EC0000B, "ecx": 0x5EC0000C, "edx": 0x5EC0000D,
           "esi": 0x5EC0000E, "edi": 0x5EC0000F, "ebp": 0x5EC00010}
FRAME = ("edi", "esi", "ebp", "esp0", "ebx", "edx", "ecx", "eax", "vec", "err", "eip", "cs",
         "eflags", "esp", "ss")

# Every general register holds a secret and the arithmetic flags hold the
# result of a compare; then it spins until the timer interrupts it.
ALL_SECRETS = """
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
""" + "".join(f"    mov {r}, {v:#x}\n" for r, v in MARKERS.items()) + """
    cmp eax, eax                   ; ZF PF: "equal"
    stc                            ; CF
spin:
    jmp spin
.include "_ulib.s"
"""


def _frame(m, pid):
    base = m.image.kernel_symbols["proc_table"]
    for slot in range(abi.NPROC):
        raw = m.read_virtual(m.cpu().cr3, base + slot * abi.PROC_SIZE, abi.PROC_SIZE, user=False)
        if int.from_bytes(raw[abi.PROC_PID:abi.PROC_PID + 4], "little") == pid:
            words = raw[abi.PROC_FRAME:abi.PROC_FRAME + 60]
            return {n: int.from_bytes(words[i * 4:i * 4 + 4], "little") for i, n in enumerate(FRAME)}
    raise KeyError(pid)


@pytest.mark.parametrize("protect", [0, 1])
def test_an_interrupt_shows_the_kernel_no_register_and_no_flag_of_a_protected_process(protect):
    m = Machine(build_image([prog("secrets", ALL_SECRETS, data_pages=1, args=(1, protect))]))
    m.run(max_ticks=5)
    frame = _frame(m, 1)
    assert frame["vec"] == abi.VEC_TIMER and frame["cs"] == abi.SEL_UCODE
    leaked = {r for r in MARKERS if frame[r] == MARKERS[r]}
    if not protect:
        assert leaked == set(MARKERS) and frame["eflags"] & 0x45 == 0x45   # CF ZF PF
    else:
        assert leaked == set() and all(frame[r] == 0 for r in MARKERS)
        assert frame["eflags"] & 0x8D5 == 0
        assert bool(m.protection.view())


def custom(hook):
    return kernel_text().replace('.include "hook_none.s"', hook)


# At the victim's first system call (a 2-byte write), the kernel sends it back
# onto its `int 0x80` (eax, the result, is 2 = SYS_WRITE: the call runs again),
# or moves its stack pointer.
REDIRECT = """
syscall_hook:
    mov eax, [esi+PROC_PID]
    inc dword ptr [rd_n+eax*4]
    cmp dword ptr [rd_n+eax*4], 1
    jne rd_out
    MODE
rd_out:
    ret
rd_n: .space 68, 0
"""
EIP = "sub dword ptr [esi+PROC_FRAME+40], 2"       # FRAME_EIP
ESP = "sub dword ptr [esi+PROC_FRAME+52], 0x100"   # FRAME_ESP

WRITES_ONCE = """
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    mov dword ptr [DATA_VADDR], 0x0A79     ; "y\\n" in the shared page
    push 0x600DF00D
    mov ebx, DATA_VADDR
    mov ecx, 2
    mov eax, SYS_WRITE
    int 0x80
    pop eax
    cmp eax, 0x600DF00D
    jne bad
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 7
    call ulib_exit
.include "_ulib.s"
"""


@pytest.mark.parametrize("what", ["eip", "esp"])
@pytest.mark.parametrize("protect", [0, 1])
def test_a_return_the_kernel_redirected_resumes_where_the_process_was(what, protect):
    hook = REDIRECT.replace("MODE", EIP if what == "eip" else ESP)
    m = Machine(build_image([prog("once", WRITES_ONCE, data_pages=1, args=(1, protect))],
                            kernel_source=custom(hook)))
    tampers = []
    m.events.subscribe(tampers.append, ev.RegisterTamper)
    m.run(max_ticks=500)
    if not protect:
        assert (m.console.text(1), m.exits) == (("y\ny\n", {1: 0}) if what == "eip"
                                                else ("y\n", {1: 7}))
    else:
        assert (m.console.text(1), m.exits) == ("y\n", {1: 0})
        [t] = tampers
        assert t.registers == (what,)


# ----------------------------------------------- descriptors behind selectors
from test_protection_attacks import keeper_under   # noqa: E402

# At the keeper's 2nd system call, move the base of the user data segment
# (selector 0x23: its DS, ES and SS) so that its stack lands on its own
# secret page (0x7FFFF000 + 0xC0802000 = 0x40801000), selectors unchanged.
TABLE = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne dt_out
    mov dword ptr [gdt+0x20], 0x2000FFFF
    mov dword ptr [gdt+0x24], 0xC0CFF280
dt_out:
    ret
"""

# The same table change, but undone after the kernel's `mov ds`/`mov es`
# and before its iretd (which reloads CS and SS only): the tables look
# honest again, while DS and ES keep a cached base of 0x1000, which makes
# the keeper compare its secret against its decoy page.  (The undo itself
# addresses through SS: its DS is already the shifted one.)
CACHE = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne dc_out
    mov dword ptr [gdt+0x20], 0x1000FFFF
    mov dword ptr [dc_armed], 1
dc_out:
    ret
dc_armed: .long 0
"""


def undo_before_iret(src):
    old = "    mov ax, SEL_UDATA\n    mov ds, ax\n    mov es, ax\n    popad"
    assert src.count(old) == 1
    return src.replace(old, "    mov ax, SEL_UDATA\n    mov ds, ax\n    mov es, ax\n"
                            "    cmp dword ptr ss:[dc_armed], 0\n    je dc_skip\n"
                            "    mov dword ptr ss:[gdt+0x20], 0x0000FFFF\n"
                            "    mov dword ptr ss:[dc_armed], 0\ndc_skip:\n    popad")


@pytest.mark.parametrize("protection", [False, True])
def test_a_descriptor_changed_behind_an_unchanged_selector_stops_the_process(protection):
    m, seen = keeper_under(TABLE, protection=protection)
    m.run(max_ticks=3000)
    assert m.exits[1] != 0 and "secret intact" not in m.console.text(1)
    violations = [e for e in seen if isinstance(e, ev.IntegrityViolation)]
    if protection:
        [v] = violations
        assert "descriptors changed" in v.reason and "ss 0x23" in v.reason
        assert m.exits[1] == 128 + abi.VEC_PF
    else:
        assert not violations


@pytest.mark.parametrize("protection", [False, True])
def test_a_segment_cache_loaded_from_a_table_changed_back_is_reloaded(protection):
    m, seen = keeper_under(CACHE, kernel_patch=undo_before_iret, protection=protection)
    m.run(max_ticks=3000)
    if not protection:
        assert m.exits[1] != 0 and "secret intact" not in m.console.text(1)   # shifted DS
    else:
        assert m.console.text(1).count("secret intact") == 5 and m.exits == {1: 0}
        assert not [e for e in seen if isinstance(e, ev.IntegrityViolation)]


# ------------------------------------------------------------ debug registers
# At the keeper's 2nd system call, arm DR0 on the instruction it returns to.
# Unprotected, the breakpoint traps into the kernel (which kills it: the
# toy kernel treats any user exception so); protected, the hit is hidden.
DEBUG = r"""
.include "hostile_victim.s"
syscall_hook:
    call hk_victim_call
    cmp eax, 2
    jne db_out
    mov eax, [esi+PROC_FRAME+40]
    mov dr0, eax
    mov eax, 1                       ; L0: DR0 is an instruction breakpoint
    mov dr7, eax
db_out:
    ret
"""


@pytest.mark.parametrize("protection", [False, True])
def test_kernel_breakpoints_do_not_reach_into_a_protected_process(protection):
    m, seen = keeper_under(DEBUG, protection=protection)
    faults = []
    m.events.subscribe(faults.append, ev.Fault)
    m.run(max_ticks=3000)
    if not protection:
        assert m.exits == {1: 128 + abi.VEC_DB}
        assert [f.vector for f in faults] == [abi.VEC_DB]
    else:
        assert m.console.text(1).count("secret intact") == 5 and m.exits == {1: 0}
        assert not faults and m.debug_traps_hidden >= 1


# ------------------------------------------------------- x87 / MMX registers
# The victim keeps secrets in MM0 (= ST0's mantissa) and in ST1 (an integer
# loaded by the x87) across a system call; the kernel reads them at entry.
FPU_VICTIM = """
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    fild dword ptr [secret2]       ; ST0 = 0x5EC2, then ST1 after the next load
    movd mm0, dword ptr [secret1]  ; MMX: ST0's mantissa (the x87 stack is full now)
    mov eax, SYS_GETPID
    int 0x80
    movd eax, mm0
    cmp eax, 0x5EC0F0F0
    jne bad
    xor eax, eax
    call ulib_exit
bad:
    mov eax, 3
    call ulib_exit
secret1: .long 0x5EC0F0F0
secret2: .long 0x5EC2
.include "_ulib.s"
"""

FPU_SPY = """
syscall_hook:
    cmp dword ptr [esi+PF_EAX], SYS_GETPID
    jne fs_out
    movd eax, mm0
    mov [fs_seen], eax
fs_out:
    ret
fs_seen: .long 0
"""


@pytest.mark.parametrize("protect", [0, 1])
def test_the_kernel_sees_no_x87_or_mmx_register_of_a_protected_process(protect):
    image = build_image([prog("fpu", FPU_VICTIM, data_pages=1, args=(1, protect))],
                        kernel_source=custom(FPU_SPY))
    m = Machine(image)
    m.run(max_ticks=500)
    seen = m.read_virtual(m.cpu().cr3, image.kernel_symbols["fs_seen"], 4, user=False)
    assert m.exits == {1: 0}                       # its own registers came back intact
    if not protect:
        assert seen == (0x5EC0F0F0).to_bytes(4, "little")
    else:
        assert seen == bytes(4)


def test_saved_x87_registers_survive_a_save_and_restore_inside_the_kernel():
    from minivmm.state import MachineState
    image = build_image([prog("fpu", FPU_VICTIM, data_pages=1, args=(1, 1))],
                        kernel_source=custom(FPU_SPY))
    m = Machine(image)
    m.run(until=lambda m: 1 in m.protection.procs and m.protection.procs[1].fpu is not None)
    assert m.protection.procs[1].in_kernel
    r = Machine.restore(MachineState.from_bytes(m.save_state().to_bytes()))
    assert r.protection.procs[1].fpu == m.protection.procs[1].fpu
    r.run(max_ticks=500)
    assert r.exits == {1: 0}


def test_a_kernel_entry_under_a_cr3_with_low_bits_set_is_still_scrubbed():
    # CR3's low bits are ignored by the MMU; a kernel that sets them when it
    # switches to the protected process must not make the VMM take the process for
    # an unprotected one at the next entry (it would see every register).
    from minivmm.cpu import read_cpu
    m = Machine(build_image([prog("secrets", ALL_SECRETS, data_pages=1, args=(0, 1))]))
    m.run(until=lambda m: m.protection.procs and read_cpu(m._uc).cpl == 3
          and read_cpu(m._uc).esi == MARKERS["esi"], max_ticks=200)
    cpu = read_cpu(m._uc)
    shown = m.protection.enter_kernel(cpu.replace(cr3=cpu.cr3 | 0x19), abi.VEC_TIMER, False)
    assert all(getattr(shown, r) == 0 for r in MARKERS), shown
    assert m.protection.procs[1].in_kernel


@pytest.mark.parametrize("vector", [abi.VEC_BP, 0x81])
def test_only_a_system_call_shows_the_kernel_its_argument_registers(vector):
    # A software interrupt the process itself raises (int3, int 0x81) is not a
    # system call: eax-edx are scrubbed like every other register.
    from minivmm.cpu import read_cpu
    m = Machine(build_image([prog("secrets", ALL_SECRETS, data_pages=1, args=(0, 1))]))
    m.run(until=lambda m: m.protection.procs and read_cpu(m._uc).cpl == 3
          and read_cpu(m._uc).esi == MARKERS["esi"], max_ticks=200)
    shown = m.protection.enter_kernel(read_cpu(m._uc), vector, True)
    assert all(getattr(shown, r) == 0 for r in MARKERS), shown


FLAGS_ACROSS_A_CALL = """
_start:
    mov eax, 1
    call ulib_arg
    test eax, eax
    jz go
    call ulib_protect
go:
    mov esi, 20
again:
    cmp esi, esi                   ; ZF PF
    stc                            ; CF
    mov eax, SYS_GETPID
    int 0x80                       ; the kernel sees them scrubbed; the process gets them back
    jnc bad
    jnz bad
    dec esi
    jnz again
    mov eax, 1
    call ulib_putdec
    xor eax, eax
    call ulib_exit
bad:
    xor eax, eax
    call ulib_putdec
    xor eax, eax
    call ulib_exit
.include "_ulib.s"
"""


@pytest.mark.parametrize("protect", [0, 1])
def test_the_flags_a_process_set_before_a_system_call_are_there_after_it(protect):
    m = Machine(build_image([prog("flags", FLAGS_ACROSS_A_CALL, data_pages=1, args=(0, protect))]))
    assert m.run(max_ticks=2000) == "shutdown"
    assert m.console.text(1) == "1" and bool(m.protection.view()) == bool(protect)
