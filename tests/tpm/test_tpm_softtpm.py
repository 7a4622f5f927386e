"""The host TPM device: persistence, restart semantics, restricted AK, corrupt state."""

import hashlib

import pytest

from tpm import EventType, SoftTpm
from tpm.errors import CorruptStateError, NoTpmStateError, RestrictedKeyError
from tpm.eventlog import Event, EventLog
from tpm.softtpm import COUNTERS_FILE, STATE_FILE, VOLATILE_FILE, PersistentState, VolatileState

D = hashlib.sha256(b"something").digest()


def test_created_on_first_use_with_its_own_directory(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    for name in (STATE_FILE, VOLATILE_FILE, COUNTERS_FILE):
        assert (tmp_path / "t" / name).exists()
    assert tpm.pcrs() == (bytes(32),) * 24
    assert tpm.clock_info().reset_count == 0
    assert tpm.ak_certificate is None


def test_keys_persist_but_pcrs_are_volatile(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    name = tpm.ak_name
    tpm.extend(8, D, data=b"x")
    assert tpm.read_pcr(8) != bytes(32)
    restarted = SoftTpm.open(tmp_path / "t")  # a new instance = power cycle (TPM Reset)
    assert restarted.ak_name == name
    assert restarted.read_pcr(8) == bytes(32)
    assert len(restarted.event_log()) == 0
    ci = restarted.clock_info()
    assert (ci.reset_count, ci.restart_count) == (1, 0)
    assert ci.clock >= tpm.clock_info().clock or True  # clock persisted, never negative


def test_resume_and_attach_keep_pcrs(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.extend(8, D, data=b"x")
    value = tpm.read_pcr(8)
    attached = SoftTpm.open(tmp_path / "t", startup=None)
    assert attached.read_pcr(8) == value
    resumed = SoftTpm.open(tmp_path / "t", startup="state")
    assert resumed.read_pcr(8) == value
    assert resumed.clock_info().restart_count == 1
    resumed.reset()
    assert resumed.read_pcr(8) == bytes(32)
    assert tpm.read_pcr(8) == bytes(32)  # same device: the first handle sees the reset


def test_two_handles_see_each_others_extends(tmp_path):
    a = SoftTpm.open(tmp_path / "t")
    b = SoftTpm.open(tmp_path / "t", startup=None)
    a.extend(8, D, data=b"a")
    b.extend(8, D, data=b"b")
    assert len(a.event_log()) == 2
    assert a.read_pcr(8) == b.read_pcr(8) == a.event_log().replay().read(8)


def test_clock_is_monotonic_across_restarts(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    c1 = tpm.quote(b"n").attest.clock_info.clock
    c2 = SoftTpm.open(tmp_path / "t").quote(b"n").attest.clock_info.clock
    assert c2 >= c1


def test_create_false_refuses(tmp_path):
    with pytest.raises(NoTpmStateError):
        SoftTpm.open(tmp_path / "nothing", create=False)


def test_extend_logs_an_event_and_is_the_only_write(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    new = tpm.extend(3, D, event_type=EventType.MANUAL, data=b"note")
    assert new == hashlib.sha256(bytes(32) + D).digest()
    assert list(tpm.event_log()) == [Event(3, EventType.MANUAL, D, b"note")]
    assert not hasattr(tpm, "set_pcr") and not hasattr(tpm, "write_pcr")


def test_restricted_key_refuses_tpm_generated_data(tpm):
    for data in (b"\xff\x54\x43\x47", b"\xffTCG" + b"forged attest"):
        with pytest.raises(RestrictedKeyError):
            tpm.sign(data)
    sig = tpm.sign(b"ordinary data")
    from tpm import keys

    ak, _ = keys.parse_public_area(tpm.ak_public)
    keys.verify(ak, b"ordinary data", sig, "sign")


def test_quote_refuses_oversized_nonce(tpm):
    with pytest.raises(ValueError):
        tpm.quote(bytes(65))


def test_state_objects_round_trip(tmp_path):
    SoftTpm.open(tmp_path / "t")
    from tpm import statefile
    from tpm.softtpm import MAX_STATE_PAYLOAD, STATE_MAGIC, STATE_VERSION

    payload = statefile.read(tmp_path / "t" / STATE_FILE, STATE_MAGIC, STATE_VERSION, MAX_STATE_PAYLOAD)
    state = PersistentState.from_bytes(payload)
    assert state.to_bytes() == payload
    log = EventLog([Event(8, EventType.MANUAL, D, b"x")])
    vs = VolatileState(7, log)
    assert VolatileState.from_bytes(vs.to_bytes()) == vs


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", [STATE_FILE, VOLATILE_FILE, COUNTERS_FILE])
@pytest.mark.parametrize(
    "damage",
    [
        lambda p: _flip(p, 20),  # payload bit flip: checksum / MAC
        lambda p: _flip(p, -1),  # trailer bit flip
        lambda p: _flip(p, 0),  # magic
        lambda p: _flip(p, 5),  # version
        lambda p: p.write_bytes(p.read_bytes()[:-7]),  # truncated
        lambda p: p.write_bytes(b""),  # empty
        lambda p: p.write_bytes(p.read_bytes() + bytes(1 << 20)),  # oversized / length
        lambda p: p.unlink(),  # missing
    ],
)
def test_corrupt_state_files_raise_naming_the_file(tmp_path, name, damage):
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.extend(8, D, data=b"x")
    tpm.counter_increment("epoch")
    path = tmp_path / "t" / name
    damage(path)
    with pytest.raises(CorruptStateError) as e:
        SoftTpm.open(tmp_path / "t", startup=None)
    assert e.value.path == path
    assert str(path) in str(e.value)
    with pytest.raises(CorruptStateError):
        tpm.read_pcr(8)  # a live handle re-reads and also refuses


def test_volatile_file_from_another_boot_is_refused(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    old = (tmp_path / "t" / VOLATILE_FILE).read_bytes()
    tpm.reset()
    (tmp_path / "t" / VOLATILE_FILE).write_bytes(old)  # restore the previous boot's log
    with pytest.raises(CorruptStateError, match="another boot"):
        tpm.pcrs()


def test_state_files_are_not_interchangeable_between_tpms(tmp_path):
    a = SoftTpm.open(tmp_path / "a")
    SoftTpm.open(tmp_path / "b")
    a.extend(8, D, data=b"x")
    # b's volatile state carries a MAC under b's internal key: a cannot take it.
    (tmp_path / "a" / VOLATILE_FILE).write_bytes((tmp_path / "b" / VOLATILE_FILE).read_bytes())
    with pytest.raises(CorruptStateError, match="MAC"):
        a.pcrs()


def test_state_writes_are_atomic_no_temp_files_left(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    for i in range(5):
        tpm.extend(i, D, data=b"x")
        tpm.counter_increment("c")
    leftovers = [p.name for p in (tmp_path / "t").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_reset_recovers_from_damaged_volatile_state(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.extend(8, D, data=b"x")
    _flip(tmp_path / "t" / VOLATILE_FILE, 20)
    with pytest.raises(CorruptStateError):
        SoftTpm.open(tmp_path / "t", startup=None)
    fresh = SoftTpm.open(tmp_path / "t")  # TPM Reset: volatile state is discarded unread
    assert fresh.pcrs() == (bytes(32),) * 24


def test_quotes_write_nothing_within_the_clock_reservation_and_a_restart_never_repeats_a_clock(tmp_path):
    """A quote persists the clock ahead (CLOCK_RESERVE_MS), not at every quote
    (an fsync each: ~10 ms inside a migration's downtime); a restarted TPM
    resumes from the reservation, so it never reports a clock value again."""
    tpm = SoftTpm.open(tmp_path / "t")
    first = tpm.quote(b"n").attest.clock_info.clock
    state = tmp_path / "t" / "tpm-state.bin"
    before = state.read_bytes()
    clocks = [first] + [tpm.quote(b"n").attest.clock_info.clock for _ in range(5)]
    assert state.read_bytes() == before          # within the reservation: no write
    assert clocks == sorted(clocks)
    again = SoftTpm.open(tmp_path / "t", startup=None).quote(b"n").attest.clock_info.clock
    assert again > max(clocks)
    restarted = SoftTpm.open(tmp_path / "t").quote(b"n").attest.clock_info.clock
    assert restarted > again


def test_a_command_on_an_unchanged_tpm_reads_no_file_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    """Each command re-reads only the files that changed since this handle last
    read or wrote them (a quote inside a migration's downtime must not pay for
    three reads and MACs); another handle's write is still seen at once."""
    from tpm import statefile
    a = SoftTpm.open(tmp_path / "t")
    b = SoftTpm.open(tmp_path / "t", startup=None)
    a.extend(8, D, data=b"a")
    reads = []
    real = statefile.read
    monkeypatch.setattr(statefile, "read", lambda path, *args: reads.append(path.name) or real(path, *args))
    a.quote(b"n")
    a.read_pcr(8)
    assert reads == []
    b.extend(9, D, data=b"b")                       # another process's write: a new file
    reads.clear()
    assert a.read_pcr(9) != bytes(32)
    assert reads == [VOLATILE_FILE]                 # ... and only that file is read again
    assert a.read_pcr(9) == b.read_pcr(9)


def test_damage_in_place_is_seen_by_a_live_handle_even_with_the_old_mtime(tmp_path):
    """A file edited in place with its timestamps put back (os.utime) is still
    read and checked again: its ctime moved, and no user can set ctime."""
    import os
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.extend(8, D, data=b"x")
    tpm.read_pcr(8)
    path = tmp_path / "t" / VOLATILE_FILE
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    with open(path, "r+b") as f:                    # same inode, same size
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptStateError) as e:
        tpm.read_pcr(8)
    assert e.value.path == path


def test_an_extend_whose_write_failed_leaves_no_event_behind(tmp_path, monkeypatch):
    """A failed write (disk full) must not leave the event in memory only: the
    handle reads its files again after any failed command."""
    import errno
    from tpm import statefile
    from tpm.errors import TpmError
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.extend(8, D, data=b"x")
    before = tpm.read_pcr(8)

    def full(path, data, mode=0o600):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(statefile, "atomic_write_bytes", full)
        with pytest.raises((OSError, TpmError)):
            tpm.extend(8, D, data=b"lost")
    assert tpm.read_pcr(8) == before
    assert [e.data for e in tpm.event_log()] == [b"x"]
