"""The key schedule (migrate/secure/keyschedule.py) against its documented construction.

The construction is recomputed here from its docstring with hashlib/hmac only (HKDF as
RFC 5869 writes it), so a label, an info string, a length prefix or a slice changed in the
code no longer derives the documented keys.  The exchange is checked for agreement, single use and the low-order point.
"""

import hashlib
import hmac
import struct

import pytest

from migrate.errors import ProtocolError
from migrate.secure import keyschedule as ks


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def documented_transcript(*parts: bytes) -> bytes:
    data = b"minivmm-secure-transcript v1\0"
    for p in parts:
        data += struct.pack("<I", len(p)) + p
    return hashlib.sha256(data).digest()


def test_transcript_hash_is_the_documented_one():
    parts = (b"HELLO body", bytes(range(64)), bytes(range(64, 128)))
    assert ks.transcript_hash(*parts) == documented_transcript(*parts)
    assert ks.transcript_hash() == hashlib.sha256(b"minivmm-secure-transcript v1\0").digest()


def test_session_keys_are_the_documented_slices_of_the_hkdf_output():
    secret, th = bytes(range(32)), documented_transcript(b"hello")
    okm = hkdf_sha256(secret, th, b"minivmm-secure-keys v1", 128)
    keys = ks.derive(secret, th)
    assert (keys.transcript, keys.s2d, keys.d2s, keys.release, keys.commit) == \
        (th, okm[0:32], okm[32:64], okm[64:96], okm[96:128])
    assert secret.hex() not in repr(keys) and okm[:32].hex() not in repr(keys)


def test_mac_is_hmac_over_label_and_length_prefixed_parts():
    key = bytes(range(32))
    want = hmac.new(key, b"label" + struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c",
                    hashlib.sha256).digest()
    assert ks.mac(key, b"label", b"ab", b"c") == want
    assert ks.mac_equal(want, want) and not ks.mac_equal(want, bytes(32))


def test_key_share_encoding_and_its_exact_length():
    share = ks.KeyShare(bytes(range(32)), bytes(range(32, 64)))
    assert share.encode() == bytes(range(64))
    assert ks.KeyShare.decode(bytes(range(64))) == share
    for n in (0, 63, 65):
        with pytest.raises(ProtocolError, match=f"KEY_SHARE of {n} bytes, expected 64"):
            ks.KeyShare.decode(bytes(n))


def test_exchange_agrees_is_used_once_and_refuses_a_low_order_share():
    a, b = ks.Ephemeral(), ks.Ephemeral()
    assert a.share.public != b.share.public and len(a.share.nonce) == 32 and a.share.nonce != b.share.nonce
    assert a.exchange(b.share.public) == b.exchange(a.share.public)
    with pytest.raises(AttributeError):
        a.exchange(b.share.public)              # the private half is gone after one use
    with pytest.raises(ProtocolError, match="peer key share refused"):
        ks.Ephemeral().exchange(bytes(32))      # the all-zero point: an all-zero secret


def test_shares_and_session_keys_cannot_be_changed_after_the_fact():
    import dataclasses
    share = ks.KeyShare(bytes(32), bytes(32))
    keys = ks.derive(bytes(range(32)), bytes(32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        share.nonce = bytes(32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.s2d = keys.d2s                     # both directions under one key: nonce reuse
