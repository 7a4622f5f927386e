"""A peer that never answers does not freeze the source's guest (issue 10,
item 5).  Real silent TCP servers; the guest's console is what shows it runs.

Not timing-based: the silent peer hangs up only once it has seen the
source's guest print more lines while the source waited on it.  A source
that froze its guest during the wait would print nothing, the peer would
never hang up, and the source would fail on its own (long) timeout instead.
"""

import socket
import threading

import pytest

from guests.build import Program, build_image
from migrate.errors import ConnectionLost, PeerTimeout
from migrate.messages import STATUS_OK, Welcome
from migrate.source import Source
from migrate.wire import Channel, RecordType
from minivmm.machine import Machine

LINES = 5           # console lines the guest must print while the source waits
WAIT = 30           # the source's timeout: reached only if the guest froze


def lines(m):
    return bytes(m.console.output).count(b"\n")


def silent_peer(m, *, welcome: bool):
    """Accept, (optionally answer HELLO like a destination), then say nothing,
    reading whatever comes; hang up once the guest has printed LINES more."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = {}

    def body():
        conn, _ = listener.accept()
        ch = Channel(conn, timeout=WAIT)
        if welcome:
            ch.recv()
            ch.send(RecordType.WELCOME, Welcome(STATUS_OK).encode())
        start = lines(m)
        seen["start"] = start
        conn.settimeout(0.01)
        while lines(m) < start + LINES:
            try:
                if conn.recv(1 << 20) == b"":
                    break
            except (socket.timeout, TimeoutError):
                pass
        seen["end"] = lines(m)
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return listener, t, seen


@pytest.mark.parametrize("welcome", [False, True], ids=["no answer to HELLO", "no ROUND_ACK"])
def test_the_guest_keeps_running_while_the_peer_says_nothing(welcome):
    m = Machine(build_image([Program.builtin("counter", args=(10_000, 100_000))], name="c"))
    m.run(max_ticks=3)
    listener, t, seen = silent_peer(m, welcome=welcome)
    with pytest.raises((ConnectionLost, PeerTimeout)) as info:
        Source(m, timeout=WAIT).migrate(listener.getsockname()[:2])
    t.join(WAIT)
    listener.close()
    assert seen["end"] >= seen["start"] + LINES, "the guest froze while the source waited"
    assert isinstance(info.value, ConnectionLost), info.value        # the peer hung up: no timeout
    if not welcome:
        assert "does not speak the minivmm migration protocol" in str(info.value)
    assert m.halted is None and not m.ram.dirty.enabled
    before = lines(m)
    m.run(max_ticks=5)
    assert lines(m) > before


def test_a_peer_that_accepts_and_never_answers_times_out_with_a_clear_error():
    m = Machine(build_image([Program.builtin("counter", args=(10_000, 100_000))], name="c"))
    m.run(max_ticks=3)
    listener = socket.create_server(("127.0.0.1", 0))         # accepts (backlog), never answers
    with pytest.raises(PeerTimeout, match="did not answer HELLO: it does not speak the minivmm"):
        Source(m, timeout=0.5).migrate(listener.getsockname()[:2])
    listener.close()
    assert m.halted is None
