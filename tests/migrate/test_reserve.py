"""Guest RAM backed before a migration arrives (migrate/reserve.py, serve --reserve-ram)."""

import threading

import numpy as np
import pytest

from guests.build import Program, build_image
from migrate.destination import Destination
from migrate.precopy import PrecopyPolicy
from migrate.reserve import RamReserve
from migrate.residency import _madvise
from migrate.server import Server
from migrate.source import Source
from minivmm.machine import Machine

MIB = 1 << 20


def test_a_reserve_hands_out_zero_backed_ram_once_and_shrinks_it_to_the_guest():
    r = RamReserve(32 * MIB)
    try:
        backed = r.wait(60)
        if _madvise() is not None:
            assert backed
        assert r.take(48 * MIB) == (None, False)          # too small for that guest: kept
        m, whole = r.take(16 * MIB)
        assert len(m) == 16 * MIB and whole == backed
        assert not np.frombuffer(m, dtype=np.uint8).any()  # as zero as a fresh mapping
        assert r.take(16 * MIB) == (None, False)          # taken: nothing until a refill
        # A session's RAM is never handed out again: a failed sealed session may
        # have left a forged record's bytes in it (decrypted in place before the
        # tag failed), and the next guest's zero pages are never written.
        m[:] = b"\xa5" * len(m)
        r.refill()
        m2, _ = r.take(32 * MIB)
        assert m2 is not None and len(m2) == 32 * MIB
        assert not np.frombuffer(m2, dtype=np.uint8).any()
        m.close()
        m2.close()
    finally:
        r.close()
    r.refill()                                            # closed: no more regions
    assert r.take(16 * MIB) == (None, False)


def test_a_guest_migrates_into_reserved_ram_byte_for_byte():
    """Zero pages are never written on the destination (fresh RAM is zero):
    reserved RAM must be exactly as zero, or those pages would hold garbage."""
    img = build_image([Program.builtin("dirtier", data_pages=512, args=(512, 0, 1)),
                       Program.builtin("counter", args=(0, 100_000))], ram_size=32 * MIB)
    m = Machine(img, ram_size=32 * MIB)
    m.run(max_ticks=10)
    reserve = RamReserve(64 * MIB)
    reserve.wait(60)
    server, result = Server("127.0.0.1:0"), {}

    def receive():
        ch, peer = server.next_connection("busy: test")
        try:
            result["dest"] = dest = Destination(timeout=10, reserve=reserve)
            result["incoming"] = dest.receive(ch, peer)
        finally:
            ch.close()
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    report = Source(m, policy=PrecopyPolicy(round_ticks=2, max_rounds=3), check_ram=True).migrate(server.label)
    t.join(60)
    server.close()
    assert report.outcome == "completed" and report.rounds[0].zero_pages > 0
    b = result["incoming"].machine
    assert b.ram.size == 32 * MIB
    assert reserve.take(16 * MIB) == (None, False)       # the migration took it
    reserve.close()
    differ = np.flatnonzero((b.ram.array != m.ram.array).reshape(-1, 4096).any(axis=1))
    assert len(differ) == 0, f"{len(differ)} pages differ on B, first {differ[:8]}"


def test_reserve_sizes_are_checked():
    with pytest.raises(ValueError):
        RamReserve(4097)
