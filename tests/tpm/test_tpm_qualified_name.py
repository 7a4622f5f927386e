"""Issue 11, item 1: qualifiedSigner is the AK's Qualified Name (TPM 2.0 Part 1, clause 16).

Known answers from a real TPM (swtpm, recorded in swtpm_recorded.py) and by hand; the
model writes the same kind of value, and the verifier accepts a genuine swtpm quote.
"""

import hashlib

import pytest

from tpm import AttestationPolicy, EventLog, Event, EventType, SoftTpm, Verifier, keys
from tpm.errors import FormatError
from tpm.evidence import _marshal
from tpm.issuer import ENDORSEMENT_QN, AkCertificate
from tpm.quote import Attest

import swtpm_recorded as rec


def test_hierarchy_qualified_name_is_its_handle():
    assert keys.hierarchy_qualified_name(keys.TPM_RH_ENDORSEMENT) == bytes.fromhex("4000000b")
    assert keys.hierarchy_qualified_name(keys.TPM_RH_OWNER) == bytes.fromhex("40000001")
    assert ENDORSEMENT_QN == bytes.fromhex("4000000b")
    with pytest.raises(ValueError):
        keys.hierarchy_qualified_name(0x81000001)  # a persistent object, not a hierarchy


def test_qualified_name_by_hand():
    name = b"\x00\x0b" + bytes(range(32))
    expected = b"\x00\x0b" + hashlib.sha256(bytes.fromhex("4000000b") + name).digest()
    assert keys.qualified_name(bytes.fromhex("4000000b"), name) == expected
    child = b"\x00\x0b" + bytes(range(1, 33))
    assert keys.qualified_name(expected, child) == b"\x00\x0b" + hashlib.sha256(expected + child).digest()
    for bad_parent in (b"", b"\x40\x00\x00", bytes(34), b"\x81\x00\x00\x01"):
        with pytest.raises(FormatError):
            keys.qualified_name(bad_parent, name)
    with pytest.raises(FormatError):
        keys.qualified_name(expected, name[:-1])


def test_known_answer_from_swtpm():
    """QN(AK) = H(QN(EK) || Name(AK)), QN(EK) = H(TPM_RH_ENDORSEMENT || Name(EK)): swtpm agrees."""
    ek_qn = keys.qualified_name(ENDORSEMENT_QN, keys.name_of(rec.EK_PUBLIC))
    assert keys.qualified_name(ek_qn, keys.name_of(rec.AK_PUBLIC)) == rec.QUALIFIED_SIGNER
    # and it is not the plain Name, which the model used to write
    assert keys.name_of(rec.AK_PUBLIC) != rec.QUALIFIED_SIGNER


def test_swtpm_structures_parse_and_round_trip():
    attest = Attest.from_bytes(rec.QUOTE_ATTEST)
    assert attest.to_bytes() == rec.QUOTE_ATTEST
    assert attest.extra_data == rec.QUOTE_NONCE
    assert list(attest.selection) == [8, 9, 10]
    pcr8 = hashlib.sha256(bytes(32) + rec.PCR8_EXTEND).digest()
    assert attest.pcr_digest == hashlib.sha256(pcr8 + bytes(64)).digest()
    _, attributes = keys.parse_public_area(rec.AK_PUBLIC)
    assert attributes == keys.AK_ATTRIBUTES  # tpm2_createak's AK has the model's template
    assert keys.public_area(keys.parse_public_area(rec.AK_PUBLIC)[0]) == rec.AK_PUBLIC
    keys.parse_signature(rec.QUOTE_SIGNATURE)


def test_model_ek_template_is_swtpms_ek_template():
    """Everything but the public point (the last 2 x 34 bytes) is the same template."""
    model = keys.ek_public_area(keys.generate_private_key().public_key())
    assert len(model) == len(rec.EK_PUBLIC) and model[:-68] == rec.EK_PUBLIC[:-68]


def test_model_quote_carries_the_ak_qualified_name(tmp_path, issuer):
    tpm = SoftTpm.open(tmp_path / "t", issuer=issuer)
    attest = tpm.quote(b"n").attest
    ek_qn = keys.qualified_name(ENDORSEMENT_QN, keys.name_of(tpm.ek_public))
    assert tpm.ak_parent_qualified_name == ek_qn
    assert attest.qualified_signer == keys.qualified_name(ek_qn, tpm.ak_name) == tpm.ak_qualified_name
    assert attest.qualified_signer != tpm.ak_name
    assert tpm.ak_certificate.parent_qualified_name == ek_qn
    assert tpm.ak_certificate.ak_qualified_name == tpm.ak_qualified_name
    # the EK is a primary key: derived from the TPM's secret, the same after a restart
    assert SoftTpm.open(tmp_path / "t").ak_qualified_name == tpm.ak_qualified_name


def test_verifier_accepts_a_genuine_swtpm_quote(issuer):
    """The recorded real-TPM quote, with its AK certified by our issuer under its EK."""
    ek_qn = keys.qualified_name(ENDORSEMENT_QN, keys.name_of(rec.EK_PUBLIC))
    cert = issuer.certify(rec.AK_PUBLIC, "swtpm", parent_qualified_name=ek_qn)
    log = EventLog([Event(8, EventType.MANUAL, rec.PCR8_EXTEND, b"a")])
    evidence = _marshal(rec.QUOTE_ATTEST, rec.QUOTE_SIGNATURE, cert.to_bytes(), log.to_bytes())
    policy = AttestationPolicy({8: [(EventType.MANUAL, rec.PCR8_EXTEND)]})
    result = Verifier([issuer]).verify(evidence, policy, expected_nonce=rec.QUOTE_NONCE)
    assert result.host == "swtpm" and result.clock_info.reset_count == 1


def test_certificate_round_trip_keeps_the_parent(issuer):
    ek_qn = keys.qualified_name(ENDORSEMENT_QN, keys.name_of(rec.EK_PUBLIC))
    cert = issuer.certify(rec.AK_PUBLIC, "swtpm", parent_qualified_name=ek_qn)
    again = AkCertificate.from_bytes(cert.to_bytes())
    assert again == cert and again.parent_qualified_name == ek_qn and again.version == 2
    assert cert.to_bytes()[4:6] == b"\x00\x02"
