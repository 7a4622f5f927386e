"""PCR extend and PCR digest: known answers computed independently with hashlib."""

import hashlib

import pytest

from tpm.errors import FormatError
from tpm.marshal import Reader
from tpm.pcr import NUM_PCRS, PcrBank, PcrSelection, extend_value, pcr_digest


def test_extend_from_zero_known_answer():
    digest = hashlib.sha256(b"minivmm").digest()
    expected = hashlib.sha256(bytes(32) + digest).digest()
    bank = PcrBank()
    assert bank.extend(8, digest) == expected
    assert bank.read(8) == expected
    assert extend_value(bytes(32), digest) == expected


def test_extend_zero_digest_pinned_literal():
    # SHA-256(0^32 || 0^32): the well-known value of a PCR extended once with zeros.
    bank = PcrBank()
    bank.extend(0, bytes(32))
    assert bank.read(0).hex() == "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"


def test_extend_chains_and_is_order_dependent():
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    one, two = PcrBank(), PcrBank()
    one.extend(3, a)
    one.extend(3, b)
    two.extend(3, b)
    two.extend(3, a)
    assert one.read(3) == hashlib.sha256(hashlib.sha256(bytes(32) + a).digest() + b).digest()
    assert one.read(3) != two.read(3)
    assert all(one.read(i) == bytes(32) for i in range(NUM_PCRS) if i != 3)


def test_pcr_digest_known_answer_is_concatenation_in_index_order():
    bank = PcrBank()
    for i, tag in ((10, b"x"), (8, b"y")):
        bank.extend(i, hashlib.sha256(tag).digest())
    sel = PcrSelection([10, 9, 8])  # order given does not matter: index order is used
    expected = hashlib.sha256(bank.read(8) + bank.read(9) + bank.read(10)).digest()
    assert bank.digest(sel) == expected
    assert pcr_digest([bank.read(8), bank.read(9), bank.read(10)]) == expected


def test_selection_bitmap_and_tpml_encoding():
    assert PcrSelection([8, 9, 10]).bitmap() == bytes([0x00, 0x07, 0x00])
    assert PcrSelection([0]).bitmap() == bytes([0x01, 0x00, 0x00])
    assert PcrSelection([23]).bitmap() == bytes([0x00, 0x00, 0x80])
    # TPML_PCR_SELECTION: count=1, TPM_ALG_SHA256, sizeofSelect=3, bitmap
    assert PcrSelection([8, 9, 10]).marshal_list().hex() == "00000001" "000b" "03" "000700"
    sel = PcrSelection([1, 7, 16, 23])
    assert PcrSelection.unmarshal_list(Reader(sel.marshal_list())) == sel
    assert PcrSelection.parse("10, 8,9") == PcrSelection([8, 9, 10])


@pytest.mark.parametrize("bad", [-1, 24, 100])
def test_bad_indices_rejected(bad):
    with pytest.raises(ValueError):
        PcrBank().extend(bad, bytes(32))
    with pytest.raises(ValueError):
        PcrSelection([bad])


def test_extend_requires_a_32_byte_digest():
    with pytest.raises(ValueError):
        PcrBank().extend(0, b"short")


def test_unmarshal_rejects_other_banks_and_empty_selection():
    for raw in ("00000002000b03000700", "00000001000403000700", "00000001000b02000700", "00000001000b03000000"):
        with pytest.raises(FormatError):
            PcrSelection.unmarshal_list(Reader(bytes.fromhex(raw)))


def test_bank_state_round_trip():
    bank = PcrBank()
    bank.extend(5, hashlib.sha256(b"5").digest())
    bank.extend(23, hashlib.sha256(b"23").digest())
    again = PcrBank.from_bytes(bank.to_bytes())
    assert again == bank
    assert again.values() == bank.values()
    with pytest.raises(FormatError):
        PcrBank.from_bytes(bank.to_bytes()[:-1])
    bank.reset()
    assert bank.values() == (bytes(32),) * NUM_PCRS
