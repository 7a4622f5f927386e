"""``--fault ACTION@N`` (migrate/fault.py) in one process: parsing, and what
close and stall do to a real channel.  crash and hang, and every step of a
whole migration, are walked with VMM processes in test_fault_walk.py."""

import argparse
import socket
import threading

import pytest

from migrate import fault
from migrate.errors import ConnectionLost
from migrate.wire import Channel, RecordType
from minivmm.cli import main


def test_parse_takes_action_at_step_and_refuses_anything_else():
    assert fault.parse("crash@3") == fault.Fault("crash", 3)
    assert str(fault.parse(" stall @ 12 ")) == "stall@12"
    for bad in ("crash", "crash@0", "boom@3", "close@-1", "hang@x", "@4"):
        with pytest.raises(argparse.ArgumentTypeError, match="ACTION@N"):
            fault.parse(bad)


def test_close_at_a_send_step_sends_nothing_more():
    args = argparse.Namespace(fault=fault.parse("close@2"), trace_steps=False)
    make = fault.wrap(Channel, args, "test")
    a, b = socket.socketpair()
    tx, rx = make(a, timeout=5), Channel(b, timeout=5)
    tx.send(RecordType.HELLO, b"one")
    with pytest.raises(ConnectionLost):
        tx.send(RecordType.PAGES, b"two")           # closed before it was written
    assert rx.recv().body == b"one"
    with pytest.raises(ConnectionLost, match="closed"):
        rx.recv()


def test_close_at_a_receive_step_keeps_the_record_received():
    args = argparse.Namespace(fault=fault.parse("close@1"), trace_steps=False)
    a, b = socket.socketpair()
    rx, tx = fault.wrap(Channel, args, "test")(b, timeout=5), Channel(a, timeout=5)
    tx.send(RecordType.COMMIT)
    assert rx.recv().type is RecordType.COMMIT      # kept: the engine acts on it
    with pytest.raises(ConnectionLost):
        rx.send(RecordType.RESUMED, b"x")


def test_stall_blocks_until_the_peer_gives_up_then_goes_on():
    """The stalled receiver keeps its record and carries on only after the peer
    closed the connection (no clock involved: the peer's close releases it)."""
    args = argparse.Namespace(fault=fault.parse("stall@1"), trace_steps=True)
    a, b = socket.socketpair()
    rx, tx = fault.wrap(Channel, args, "test")(b, timeout=5), Channel(a, timeout=5)
    out = {}

    def body():
        out["rec"] = rx.recv()
        out["next"] = rx.recv()
    t = threading.Thread(target=body, daemon=True)
    tx.send(RecordType.PREPARED)
    t.start()
    t.join(1.0)
    assert t.is_alive() and "rec" not in out        # stalled at step 1, the record in hand
    tx.send(RecordType.ABORT, b"gave up")           # what a peer whose deadline fired sends
    tx.close()
    t.join(30)
    assert not t.is_alive()
    assert out["rec"].type is RecordType.PREPARED and out["next"].type is RecordType.ABORT


def test_run_refuses_a_fault_without_a_migration(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "counter", "--fault", "crash@3"])
    assert exc.value.code == 2
    assert "only mean something with --migrate-to" in capsys.readouterr().err
