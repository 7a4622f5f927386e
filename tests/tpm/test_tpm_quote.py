"""TPMS_ATTEST layout, the evidence bundle, and fuzzing of their parsers."""

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpm.errors import QuoteFormatError, VerificationError
from tpm.evidence import MAX_EVIDENCE_SIZE, Evidence
from tpm.pcr import PcrSelection
from tpm.quote import (
    MAX_ATTEST_SIZE,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Attest,
    ClockInfo,
    bind_nonce,
)


def _attest(**kw) -> Attest:
    fields = dict(
        qualified_signer=b"\x00\x0b" + bytes(range(32)),
        extra_data=b"N" * 32,
        clock_info=ClockInfo(clock=0x0102030405060708, reset_count=3, restart_count=1, safe=True),
        firmware_version=0x1122334455667788,
        selection=PcrSelection([8, 9, 10]),
        pcr_digest=hashlib.sha256(b"pcrs").digest(),
    )
    fields.update(kw)
    return Attest(**fields)


def test_exact_byte_layout():
    a = _attest()
    raw = a.to_bytes()
    expected = (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", 34) + b"\x00\x0b" + bytes(range(32))  # qualifiedSigner
        + struct.pack(">H", 32) + b"N" * 32  # extraData
        + struct.pack(">QIIB", 0x0102030405060708, 3, 1, 1)  # clockInfo
        + struct.pack(">Q", 0x1122334455667788)  # firmwareVersion
        + struct.pack(">IHB", 1, 0x000B, 3) + b"\x00\x07\x00"  # TPML_PCR_SELECTION
        + struct.pack(">H", 32) + hashlib.sha256(b"pcrs").digest()  # pcrDigest
    )
    assert raw == expected
    assert TPM_GENERATED_VALUE == 0xFF544347 and TPM_ST_ATTEST_QUOTE == 0x8018
    assert Attest.from_bytes(raw) == a


def test_max_size_is_reached_by_largest_attest():
    assert len(_attest(extra_data=b"x" * 64).to_bytes()) == MAX_ATTEST_SIZE


@pytest.mark.parametrize("cut", range(0, 140, 7))
def test_every_truncation_is_a_quote_format_error(cut):
    raw = _attest().to_bytes()
    with pytest.raises(QuoteFormatError):
        Attest.from_bytes(raw[:cut])


@pytest.mark.parametrize(
    "offset,value",
    [
        (0, b"\xff\x54\x43\x48"),  # magic
        (4, b"\x80\x14"),  # type: TPM_ST_ATTEST_CERTIFY is not a quote
        (6, b"\x00\x21"),  # qualifiedSigner size
        (42, b"\x00\x41"),  # extraData size 65 > 64
        (44 + 32 + 16, b"\x02"),  # safe is a TPMI_YES_NO
    ],
)
def test_bad_fields_rejected(offset, value):
    raw = bytearray(_attest().to_bytes())
    raw[offset : offset + len(value)] = value
    with pytest.raises(QuoteFormatError):
        Attest.from_bytes(bytes(raw))


def test_trailing_and_oversized_rejected():
    raw = _attest().to_bytes()
    with pytest.raises(QuoteFormatError):
        Attest.from_bytes(raw + b"\x00")
    with pytest.raises(QuoteFormatError):
        Attest.from_bytes(raw + bytes(1000))


def test_quote_format_error_is_a_verification_error():
    assert issubclass(QuoteFormatError, VerificationError)


def test_bind_nonce_is_deterministic_and_binding():
    n = bytes(32)
    assert bind_nonce(n, b"t1") == bind_nonce(n, b"t1")
    assert bind_nonce(n, b"t1") != bind_nonce(n, b"t2")
    assert bind_nonce(n, b"t1") != bind_nonce(n + b"\x00", b"t1")
    expected = hashlib.sha256(b"minivmm-quote-binding\0" + b"\x00\x20" + n + b"t1").digest()
    assert bind_nonce(n, b"t1") == expected


# -- evidence bundle ---------------------------------------------------------
@pytest.fixture
def evidence_bytes(measured):
    return measured.quote(b"n" * 32).to_bytes()


def test_evidence_round_trip(evidence_bytes):
    ev = Evidence.from_bytes(evidence_bytes)
    assert ev.to_bytes() == evidence_bytes
    assert ev.attest.extra_data == b"n" * 32
    assert len(ev.event_log) == 3
    assert ev.certificate is not None
    assert evidence_bytes[:4] == b"MVQB"


def test_evidence_truncations(evidence_bytes):
    for cut in list(range(0, 300, 13)) + [len(evidence_bytes) - 1]:
        with pytest.raises(QuoteFormatError):
            Evidence.from_bytes(evidence_bytes[:cut])
    with pytest.raises(QuoteFormatError):
        Evidence.from_bytes(evidence_bytes + b"\x00")
    with pytest.raises(QuoteFormatError):
        Evidence.from_bytes(bytes(MAX_EVIDENCE_SIZE + 1))


# Fuzzing (issue 19: the parsers must refuse with QuoteFormatError and nothing else, and
# whatever they accept must be the one encoding of what they return).  Seeded, fixed budget.
@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_attest_parser_refuses_garbage_with_quote_format_error(data):
    with pytest.raises(QuoteFormatError):
        Attest.from_bytes(data)  # random bytes never start with the 4-byte magic + 0x8018


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    signer=st.binary(min_size=34, max_size=34),
    extra=st.binary(max_size=64),
    clock=st.integers(0, 2**64 - 1),
    reset=st.integers(0, 2**32 - 1),
    restart=st.integers(0, 2**32 - 1),
    safe=st.booleans(),
    fw=st.integers(0, 2**64 - 1),
    pcrs=st.sets(st.integers(0, 23), min_size=1),
    digest=st.binary(min_size=32, max_size=32),
)
def test_fuzz_valid_attests_round_trip(signer, extra, clock, reset, restart, safe, fw, pcrs, digest):
    a = Attest(signer, extra, ClockInfo(clock, reset, restart, safe), fw, PcrSelection(pcrs), digest)
    raw = a.to_bytes()
    assert Attest.from_bytes(raw) == a
    assert Attest.from_bytes(raw).to_bytes() == raw


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_evidence_garbage(data):
    for candidate in (data, b"MVQB\x00\x02" + data):
        with pytest.raises(QuoteFormatError):
            Evidence.from_bytes(candidate)


@settings(derandomize=True, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_evidence_mutations(evidence_bytes, data):
    """Truncate, flip and splice a real bundle: QuoteFormatError, or a bundle whose bytes
    are exactly its one encoding (a flip inside a digest or the signature still parses)."""
    raw = bytearray(evidence_bytes)
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    raw += data.draw(st.binary(max_size=8))
    try:
        ev = Evidence.from_bytes(bytes(raw))
    except QuoteFormatError:
        return
    assert ev.to_bytes() == bytes(raw)
    assert Evidence.from_bytes(ev.to_bytes()) == ev
    assert ev.attest.to_bytes() == ev.attest_bytes


@settings(derandomize=True, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_evidence_never_verifies_unless_unchanged(measured, policy, issuer, data):
    """Whatever a mutation leaves parseable, the verifier refuses with a VerificationError
    unless the bytes are unchanged (then it accepts)."""
    from tpm import Verifier

    verifier = Verifier([issuer.public_key])
    nonce = verifier.new_nonce()
    good = measured.quote(nonce).to_bytes()
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    if bytes(raw) == good:  # two flips that cancel out
        return
    with pytest.raises(VerificationError):
        verifier.verify(bytes(raw), policy, expected_nonce=nonce)
    verifier.verify(good, policy, expected_nonce=nonce)


def test_quote_bytes_is_the_encoding_of_a_quote(measured, verifier, policy, tmp_path):
    """What a VMM sends (quote_bytes: not parsed back) is the evidence quote()
    returns, byte for byte but for what differs between any two quotes (the
    clock and the randomised ECDSA signature); it verifies, and a TPM without
    an AK certificate sends none (its verifier then names the unknown issuer)."""
    from tpm import Evidence

    nonce = bytes(range(32))
    sent = Evidence.from_bytes(measured.quote_bytes(nonce, [8, 9, 10]))
    parsed = measured.quote(nonce, [8, 9, 10])
    assert sent.certificate_bytes == parsed.certificate_bytes != b""
    assert sent.eventlog_bytes == parsed.eventlog_bytes
    assert (sent.attest.qualified_signer, sent.attest.extra_data, sent.attest.selection,
            sent.attest.pcr_digest) == (parsed.attest.qualified_signer, parsed.attest.extra_data,
                                        parsed.attest.selection, parsed.attest.pcr_digest)
    assert verifier.verify(measured.quote_bytes(nonce, [8, 9, 10]), policy, expected_nonce=nonce)
    assert measured.certified

    from tpm import SoftTpm
    bare = SoftTpm.open(tmp_path / "bare", host="bare")
    assert not bare.certified
    assert Evidence.from_bytes(bare.quote_bytes(nonce, [8])).certificate_bytes == b""
