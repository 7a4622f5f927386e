"""Hostile handshakes: whatever a peer sends as its key share and its quote, a
secure destination ends the session with a MigrationError that says what failed
-- never a crash, never a session that goes on.  (Hypothesis, derandomized.)"""

import os
import socket

import pytest
from hypothesis import given, settings, strategies as st

from migrate.errors import MigrationError
from migrate.messages import Hello
from migrate.secure.channel import SealedChannel
from migrate.secure.errors import AttestationFailed
from migrate.secure.keyschedule import Ephemeral
from migrate.wire import Channel, RecordType

from securehelp import Trust

FUZZ = settings(derandomize=True, max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    trust = Trust(tmp_path_factory.mktemp("trust"))
    a, b = trust.host("a"), trust.host("b", role="destination")
    evidence = trust.mode(a).attestor.quote(os.urandom(32), os.urandom(32))    # genuine, other session
    return trust, b, evidence


HELLO = Hello(16 << 20, {"vm": "x", "mode": "secure", "vm_id": "ab" * 16, "generation": 1})


def handshake(trust, b, key_share: bytes, quote: bytes):
    s, d = socket.socketpair()
    try:
        peer = Channel(s, timeout=2)
        peer.send_seq = 1                   # after its HELLO
        peer.send(RecordType.KEY_SHARE, key_share)
        peer.send(RecordType.QUOTE, quote)
        ch = SealedChannel(d, role="destination", timeout=2)
        ch.recv_seq = 1                     # HELLO was record 0
        body = HELLO.encode()
        trust.mode(b).destination_handshake(ch, Hello.decode(body), body)
    finally:
        s.close()
        d.close()


def test_a_genuine_quote_from_another_session_is_stale(world):
    trust, b, evidence = world
    with pytest.raises(AttestationFailed, match="stale nonce or quote bound to another session"):
        handshake(trust, b, Ephemeral().share.encode(), evidence)


@FUZZ
@given(st.data())
def test_a_modified_quote_never_passes(world, data):
    trust, b, evidence = world
    bad = bytearray(evidence)
    for _ in range(data.draw(st.integers(1, 3))):
        bad[data.draw(st.integers(0, len(bad) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(bad)))
    quote = bytes(bad[:cut]) if data.draw(st.booleans()) else bytes(bad)
    with pytest.raises(MigrationError):
        handshake(trust, b, Ephemeral().share.encode(), quote)


@FUZZ
@given(st.binary(min_size=0, max_size=80), st.binary(max_size=600))
def test_garbage_key_shares_and_quotes_end_the_session(world, key_share, quote):
    trust, b, _ = world
    with pytest.raises(MigrationError):
        handshake(trust, b, key_share, quote)
