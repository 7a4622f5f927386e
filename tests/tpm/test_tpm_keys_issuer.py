"""TPMT_PUBLIC / Name / TPMT_SIGNATURE and the issuer with its AK certificates."""

import hashlib

import pytest

from tpm import keys
from tpm.errors import CertificateError, CorruptStateError, FormatError, SignatureError
from tpm.issuer import ISSUER_FILE, ISSUER_PUB_FILE, AkCertificate, Issuer, key_id, load_trust_anchor


def test_public_area_layout_name_and_round_trip():
    key = keys.generate_private_key()
    pub = keys.public_area(key.public_key())
    assert len(pub) == 88
    # type ECC, nameAlg SHA-256, attributes, empty authPolicy, NULL sym, ECDSA/SHA-256, P-256, NULL kdf
    assert pub[:20].hex() == "0023" "000b" "00050072" "0000" "0010" "0018" "000b" "0003" "0010"
    parsed, attributes = keys.parse_public_area(pub)
    assert attributes == keys.AK_ATTRIBUTES
    assert attributes & keys.RESTRICTED and attributes & keys.SIGN
    assert keys.public_area(parsed) == pub
    assert keys.name_of(pub) == b"\x00\x0b" + hashlib.sha256(pub).digest()


def test_point_not_on_curve_rejected():
    pub = bytearray(keys.public_area(keys.generate_private_key().public_key()))
    pub[-1] ^= 1
    with pytest.raises(FormatError):
        keys.parse_public_area(bytes(pub))


def test_sign_verify_and_signature_layout():
    key = keys.generate_private_key()
    sig = keys.sign(key, b"message")
    assert len(sig) == keys.SIGNATURE_SIZE
    assert sig[:4].hex() == "0018000b"
    keys.verify(key.public_key(), b"message", sig, "test")
    with pytest.raises(SignatureError):
        keys.verify(key.public_key(), b"messagE", sig, "test")
    with pytest.raises(SignatureError):
        keys.verify(keys.generate_private_key().public_key(), b"message", sig, "test")
    with pytest.raises(SignatureError):
        keys.verify(key.public_key(), b"message", sig[:-1], "test")


def test_private_key_round_trip():
    key = keys.generate_private_key()
    again = keys.private_from_bytes(keys.private_to_bytes(key))
    assert keys.public_area(again.public_key()) == keys.public_area(key.public_key())
    with pytest.raises(FormatError):
        keys.private_from_bytes(bytes(32))  # zero is not a valid scalar


def test_issuer_persists_and_certifies(tmp_path):
    issuer = Issuer.create(tmp_path / "iss", "lab")
    assert (tmp_path / "iss" / ISSUER_FILE).exists()
    again = Issuer.load(tmp_path / "iss")
    assert again.key_id == issuer.key_id and again.name == "lab"
    assert Issuer.open(tmp_path / "iss").key_id == issuer.key_id
    assert key_id(load_trust_anchor(tmp_path / "iss")) == issuer.key_id
    assert key_id(load_trust_anchor(tmp_path / "iss" / ISSUER_PUB_FILE)) == issuer.key_id
    with pytest.raises(FileExistsError):
        Issuer.create(tmp_path / "iss")

    ak = keys.public_area(keys.generate_private_key().public_key())
    cert = issuer.certify(ak, "host-a")
    raw = cert.to_bytes()
    assert raw[:4] == b"MVAC"
    assert AkCertificate.from_bytes(raw) == cert
    keys.verify(issuer.public_key, cert.tbs(), cert.signature, "cert")
    assert cert.ak_name == keys.name_of(ak)


def test_issuer_state_round_trip(tmp_path):
    issuer = Issuer.create(tmp_path / "iss", "lab")
    again = Issuer.from_state(issuer.to_state())
    assert again.key_id == issuer.key_id and again.to_state() == issuer.to_state()


def test_issuer_refuses_unrestricted_keys():
    issuer = Issuer(keys.generate_private_key(), "lab")
    pub = keys.public_area(keys.generate_private_key().public_key(), attributes=keys.SIGN | keys.FIXED_TPM)
    with pytest.raises(CertificateError):
        issuer.certify(pub, "host")


def test_corrupt_issuer_file(tmp_path):
    Issuer.create(tmp_path / "iss")
    path = tmp_path / "iss" / ISSUER_FILE
    raw = bytearray(path.read_bytes())
    raw[12] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStateError) as e:
        Issuer.load(tmp_path / "iss")
    assert e.value.path == path
    (tmp_path / "iss" / ISSUER_PUB_FILE).write_text("not a key")
    with pytest.raises(CorruptStateError):
        load_trust_anchor(tmp_path / "iss")


def test_certificate_parser_bounds():
    issuer = Issuer(keys.generate_private_key(), "lab")
    raw = issuer.certify(keys.public_area(keys.generate_private_key().public_key()), "h").to_bytes()
    for cut in range(0, len(raw), 9):
        with pytest.raises(FormatError):
            AkCertificate.from_bytes(raw[:cut])
    with pytest.raises(FormatError):
        AkCertificate.from_bytes(raw + b"\x00")
