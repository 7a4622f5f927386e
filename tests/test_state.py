"""Machine state: explicit, versioned, restorable in another OS process."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from guests.build import Program
from guesthelp import boot
from minivmm.console import Console
from minivmm.cpu import CpuState
from minivmm.errors import StateError
from minivmm.machine import Machine
from minivmm.state import HEADER, VERSION, MachineState
from minivmm.timer import Timer

P = Program.builtin


def workload():
    return boot(P("counter", args=(12, 120_000), as_name="a"), P("memcheck", args=(6,)),
                P("counter", args=(12, 90_000), as_name="b"))


def test_cpu_state_round_trip():
    m = workload()
    m.run(max_ticks=3)
    cpu = m.cpu()
    assert CpuState.from_dict(cpu.to_dict()) == cpu
    with pytest.raises(ValueError, match="missing"):
        CpuState.from_dict({k: v for k, v in cpu.to_dict().items() if k != "eip"})
    with pytest.raises(ValueError, match="not a u32"):
        CpuState.from_dict({**cpu.to_dict(), "eax": -1})


def test_timer_and_console_state_round_trip():
    t = Timer(5000, 7)
    t.advance(12_000)
    t.acknowledge()
    assert Timer.restore(t.save()).save() == t.save()
    c = Console()
    for ch, pid in ((b"a", 0), (b"b", 2), (b"c", 2)):
        c.select(pid)
        c.put(ch[0])
    again = Console.restore(c.save())
    assert again.save() == c.save() and again.text(2) == "bc"


def test_machine_state_round_trip_bytes():
    m = workload()
    m.run(max_ticks=4)
    st = m.save_state()
    again = MachineState.from_bytes(st.to_bytes())
    assert again == st


def test_restore_continues_exactly_from_user_and_kernel_mode():
    ref = workload()
    ref.run(max_ticks=10_000)
    cpls = set()
    for steps, want_user in ((1, False), (7, False), (40, True), (97, False), (ref.slices - 3, False)):
        m = workload()
        for _ in range(steps):
            m.step()
        while want_user and m.cpu().cpl != 3:       # stop in the middle of user code
            m.step()
        assert not m.halted
        cpls.add(m.cpu().cpl)
        clone = Machine.restore(MachineState.from_bytes(m.save_state().to_bytes()))
        assert clone.run(max_ticks=10_000) == "shutdown"
        assert clone.console.text() == ref.console.text()
        assert clone.vclock == ref.vclock and clone.ticks == ref.ticks
        assert clone.exits == ref.exits
    assert cpls == {0, 3}            # restored into both privilege levels


def test_restore_leaves_guest_ram_byte_for_byte_in_user_and_kernel_mode():
    """Loading the saved selectors on restore must not write guest memory: a
    segment load sets the accessed bit of its GDT descriptor, and the guest's
    own entry to user mode (iret) had not set it, so a guest restored in user
    mode found one GDT byte changed (a migrated run differed from one never
    migrated in a byte the guest can read)."""
    for want in (3, 0):
        m = workload()
        for _ in range(40):
            m.step()
        while m.cpu().cpl != want:
            m.step()
        st = m.save_state()
        clone = Machine.restore(MachineState.from_bytes(st.to_bytes()))
        changed = [hex(int(a)) for a in np.flatnonzero(clone.ram.array != m.ram.array)[:8]]
        assert changed == [], (want, changed)


def test_corrupt_state_gets_clear_errors():
    m = boot(P("hello"))
    blob = m.save_state().to_bytes()
    with pytest.raises(StateError, match="truncated"):
        MachineState.from_bytes(blob[:20])
    with pytest.raises(StateError, match="not a minivmm machine state"):
        MachineState.from_bytes(b"NOTSTATE" + blob[8:])
    with pytest.raises(StateError, match="version 4"):
        MachineState.from_bytes(blob[:8] + struct.pack("<H", 4) + blob[10:])
    with pytest.raises(StateError, match="version 2 kept process keys in clear"):
        MachineState.from_bytes(blob[:8] + struct.pack("<H", 2) + blob[10:])
    with pytest.raises(StateError, match="version 1"):    # before protection metadata
        MachineState.from_bytes(blob[:8] + struct.pack("<H", 1) + blob[10:])
    with pytest.raises(StateError, match="truncated or padded"):
        MachineState.from_bytes(blob[:-1])
    with pytest.raises(StateError, match="checksum"):
        MachineState.from_bytes(blob[:HEADER.size] + bytes([blob[HEADER.size] ^ 1]) + blob[HEADER.size + 1:])
    # A forged header with a matching checksum but nonsense inside.
    import hashlib
    body = b"{}" + b"x"
    forged = HEADER.pack(b"MVMSTATE", VERSION, 0, 2, 1, 16 << 20, hashlib.sha256(body).digest()) + body
    with pytest.raises(StateError, match="RAM section|malformed"):
        MachineState.from_bytes(forged)
    huge = HEADER.pack(b"MVMSTATE", VERSION, 0, 2, 1, 1 << 31, b"\0" * 32)
    with pytest.raises(StateError, match="out of bounds"):
        MachineState.from_bytes(huge)


def test_save_then_restore_in_another_process_matches_uninterrupted(tmp_path):
    cli = [sys.executable, "-m", "minivmm", "run"]
    env = dict(os.environ)
    full = subprocess.run(cli + ["multi"], capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == 0, full.stderr
    state = tmp_path / "multi.mvstate"
    first = subprocess.run(cli + ["multi", "--ticks", "25", "--save-state", str(state)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 3, first.stderr
    second = subprocess.run(cli + [str(state), "--restore"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert second.returncode == 0, second.stderr
    assert first.stdout and second.stdout
    assert first.stdout + second.stdout == full.stdout


def test_register_class_cache_is_installed_and_agrees_with_unicorn():
    from unicorn import x86_const
    from unicorn.unicorn_py3.arch.intel import UcIntel
    from minivmm import regcache
    assert regcache.install()
    cached = UcIntel._select_reg_class
    original = cached.__wrapped__
    for name, reg in vars(x86_const).items():
        if name.startswith("UC_X86_REG_") and isinstance(reg, int):
            assert cached(reg) is original(UcIntel, reg), name


def test_a_saved_state_is_private_to_its_owner(tmp_path):
    # It holds process keys, real registers and plaintext (issue 9 item 7).
    import os
    import stat
    from guests.build import Program, build_image
    from minivmm.machine import Machine
    m = Machine(build_image([Program.builtin("hello")]))
    fresh, old = tmp_path / "fresh.mvstate", tmp_path / "old.mvstate"
    old.write_bytes(b"x")
    old.chmod(0o644)
    mask = os.umask(0)                  # even with nothing masked
    try:
        m.save(fresh)
        m.save(old)
    finally:
        os.umask(mask)
    for path in (fresh, old):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert Machine.load(path).cpu() == m.cpu()
