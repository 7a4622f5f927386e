"""The data path's reference (``migrate/bench_datapath.py``): it moves the bytes
with each mode's per-byte work and proves it did, never how fast."""

import numpy as np
import pytest

from migrate import bench_datapath
from migrate.bench_datapath import DatapathError, datapath_rate

MIB = 1 << 20


@pytest.mark.parametrize("kind", ["plain", "secure"])
def test_each_mode_moves_the_bytes_and_the_child_confirms_its_tags(kind):
    ram = np.random.default_rng(7).integers(0, 256, 8 * MIB, dtype=np.uint8)
    assert datapath_rate(kind, 8 * MIB, ram=ram) > 0


@pytest.mark.parametrize("kind, skip", [("plain", "tags.update(g.tag)"), ("secure", "tags.update(tag)")])
def test_a_child_that_skips_its_work_on_a_record_is_caught(kind, skip, monkeypatch):
    """The figure is only worth something if the work was done: a receiver
    that leaves one record's tag out of its digest fails the comparison."""
    assert skip in bench_datapath._SINK
    lazy = bench_datapath._SINK.replace(skip, f"(i != 3) and {skip}")
    monkeypatch.setattr(bench_datapath, "_SINK", lazy)
    with pytest.raises(DatapathError, match=f"{kind} data path: the child's tags do not match"):
        datapath_rate(kind, 8 * MIB)


def test_a_wrong_byte_fails_the_secure_receivers_tag_check(monkeypatch):
    """Secure: the receiver checks each record's tag as the channel does; a
    byte flipped on the way makes it stop, and the parent says so."""
    flip = bench_datapath._SINK.replace("d.update_into(dst, dst)",
                                        "dst[5] ^= 1 if i == 2 else 0\n        d.update_into(dst, dst)")
    monkeypatch.setattr(bench_datapath, "_SINK", flip)
    with pytest.raises(DatapathError, match="secure data path.*InvalidTag"):
        datapath_rate("secure", 8 * MIB)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one of"):
        datapath_rate("fast", 8 * MIB)
    with pytest.raises(ValueError, match="multiple"):
        datapath_rate("plain", MIB + 1)


def test_a_child_that_never_listens_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bench_datapath, "_SINK", "import sys; sys.exit('no socket for you')")
    with pytest.raises(DatapathError, match="plain data path.*exit status 1: no socket for you"):
        datapath_rate("plain", 8 * MIB)
