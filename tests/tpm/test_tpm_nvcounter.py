"""Monotonic NV counters: increment only, survive restarts, rollback detected."""

import pytest

from tpm import SoftTpm
from tpm.errors import CorruptStateError, CounterError, FormatError
from tpm.nvcounter import MAX_COUNTERS, NvCounters
from tpm.softtpm import COUNTERS_FILE, STATE_FILE


def test_monotonic_and_persistent_across_restarts(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    assert tpm.counter_read("vm-1.epoch") == 0
    assert [tpm.counter_increment("vm-1.epoch") for _ in range(3)] == [1, 2, 3]
    assert tpm.counter_increment("other") == 1
    seen = 3
    for _ in range(3):
        tpm = SoftTpm.open(tmp_path / "t")  # power cycle
        assert tpm.counter_read("vm-1.epoch") == seen
        seen = tpm.counter_increment("vm-1.epoch")
    assert seen == 6
    assert tpm.counters() == [("other", 1), ("vm-1.epoch", 6)]
    assert not hasattr(tpm, "counter_set") and not hasattr(tpm, "counter_decrement")


def test_rolled_back_counters_file_is_detected(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.counter_increment("epoch")
    old = (tmp_path / "t" / COUNTERS_FILE).read_bytes()  # valid MAC, value 1
    tpm.counter_increment("epoch")
    tpm.counter_increment("epoch")
    (tmp_path / "t" / COUNTERS_FILE).write_bytes(old)
    with pytest.raises(CounterError, match="rolled back"):
        SoftTpm.open(tmp_path / "t")
    with pytest.raises(CounterError):
        tpm.counter_read("epoch")


def test_interrupted_increment_is_completed(tmp_path):
    """Crash after the counters file was written but before the state file: accepted."""
    tpm = SoftTpm.open(tmp_path / "t")
    state_before = (tmp_path / "t" / STATE_FILE).read_bytes()
    assert tpm.counter_increment("epoch") == 1
    (tmp_path / "t" / STATE_FILE).write_bytes(state_before)  # state write "lost"
    again = SoftTpm.open(tmp_path / "t")
    assert again.counter_read("epoch") == 1
    assert again.counter_increment("epoch") == 2


def test_edited_counters_file_is_corrupt(tmp_path):
    tpm = SoftTpm.open(tmp_path / "t")
    tpm.counter_increment("epoch")
    path = tmp_path / "t" / COUNTERS_FILE
    raw = bytearray(path.read_bytes())
    raw[-33] ^= 1  # last byte of the payload: the counter value
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStateError) as e:
        SoftTpm.open(tmp_path / "t")
    assert e.value.path == path


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ü", "a/b"])
def test_bad_names(tpm, name):
    with pytest.raises(CounterError):
        tpm.counter_increment(name)


def test_counter_table_round_trip_and_bounds():
    c = NvCounters()
    for name in ("b", "a", "c"):
        c.increment(name)
    c.increment("a")
    again = NvCounters.from_bytes(c.to_bytes())
    assert again == c and again.read("a") == 2 and again.generation == 4
    with pytest.raises(FormatError):
        NvCounters.from_bytes(c.to_bytes()[:-1])
    full = NvCounters({f"c{i}": 1 for i in range(MAX_COUNTERS)})
    with pytest.raises(CounterError):
        full.increment("one-more")
    exhausted = NvCounters({"x": 2**64 - 1})
    with pytest.raises(CounterError):
        exhausted.increment("x")
