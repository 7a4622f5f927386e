"""Process keys in a state file, sealed to this host's TPM
(migrate/secure/statekeys.py), byte by byte (issue 19, seeded bugs).

Known answers rebuilt from the blob documented there (magic, version, length
of the sealed data key, the key sealed to the TPM, AES-GCM with everything
before it and the VM's identity binding as associated data).  A hostile
state file -- cut short, another format, a sealed-key length past the bound --
is refused before the TPM is asked to unseal anything; and a blob of another
magic or version is refused even when it would authenticate (the checks, not
the AEAD, say which format this reader opens)."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migrate.secure.statekeys import MAX_SEALED_KEY, TpmKeyWrap
from minivmm.errors import StateError
from tpm import SoftTpm

BOUND = b"vm 5e5e... generation 3"


def documented(tpm, secret, *, magic=b"MVSK", version=1, bound=BOUND):
    """4 magic || u16 version || u32 n || n sealed key || AES-256-GCM(key, nonce 0, secret, AAD)."""
    key = bytes(range(32))
    sealed = tpm.seal(key, None)
    head = magic + version.to_bytes(2, "little") + len(sealed).to_bytes(4, "little") + sealed
    return head, head + AESGCM(key).encrypt(bytes(12), secret, head + bound)


@pytest.fixture
def tpm(tmp_path):
    return SoftTpm.open(tmp_path / "tpm")


@pytest.fixture
def unseals(monkeypatch):
    """The length of every blob this process asks a soft TPM to unseal."""
    calls = []
    unseal = SoftTpm.unseal

    def spy(self, blob):
        calls.append(len(blob))
        return unseal(self, blob)
    monkeypatch.setattr(SoftTpm, "unseal", spy)
    return calls


def test_a_documented_wrap_opens_and_wrap_writes_the_documented_format(tmp_path, tpm):
    wrap = TpmKeyWrap(tmp_path / "tpm")
    _, data = documented(tpm, b"process keys")
    assert wrap.unwrap(data, BOUND) == b"process keys"
    blob = wrap.wrap(b"other keys", BOUND)
    n = int.from_bytes(blob[6:10], "little")
    assert blob[:6] == b"MVSK\1\0" and 0 < n <= MAX_SEALED_KEY
    key = tpm.unseal(blob[10:10 + n])
    assert AESGCM(key).decrypt(bytes(12), blob[10 + n:], blob[:10 + n] + BOUND) == b"other keys"


def test_every_truncation_is_refused_before_the_tpm_is_asked(tmp_path, tpm, unseals):
    wrap = TpmKeyWrap(tmp_path / "tpm")
    _, data = documented(tpm, b"")              # the shortest whole blob: an empty secret
    for cut in range(len(data)):
        expect = "not a minivmm TPM key wrap" if cut < 10 else "truncated"
        with pytest.raises(StateError, match=expect):
            wrap.unwrap(data[:cut], BOUND)
    assert unseals == []
    assert wrap.unwrap(data, BOUND) == b""


@pytest.mark.parametrize("magic, version, expect", [
    (b"MVSX", 1, "not a minivmm TPM key wrap"),
    (b"mvsk", 1, "not a minivmm TPM key wrap"),
    (b"MVSK", 2, "version 2, this VMM reads 1"),
    (b"MVSK", 0, "version 0, this VMM reads 1"),
])
def test_a_blob_of_another_format_is_refused_even_if_it_would_authenticate(tmp_path, tpm, unseals,
                                                                           magic, version, expect):
    _, data = documented(tpm, b"keys", magic=magic, version=version)
    with pytest.raises(StateError, match=expect):
        TpmKeyWrap(tmp_path / "tpm").unwrap(data, BOUND)
    assert unseals == []


def test_a_sealed_key_length_past_the_bound_never_reaches_the_tpm(tmp_path, tpm, unseals):
    """The documented bound: n <= 4096."""
    wrap = TpmKeyWrap(tmp_path / "tpm")
    for n in (4097, 1 << 31):                   # the blob is long enough: the bound alone refuses
        blob = b"MVSK\1\0" + n.to_bytes(4, "little") + bytes(4096 + 100)
        with pytest.raises(StateError, match="truncated"):
            wrap.unwrap(blob, BOUND)
    assert unseals == []
    n = 4096                                    # the largest length read: the TPM judges it
    with pytest.raises(StateError, match="cannot unseal its process keys"):
        wrap.unwrap(b"MVSK\1\0" + n.to_bytes(4, "little") + bytes(n + 16), BOUND)
    assert unseals == [n]
