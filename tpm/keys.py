"""ECDSA P-256 keys in TPM 2.0 form: TPMT_PUBLIC, Names and TPMT_SIGNATURE.

The attestation key (AK) is described to the outside world exactly as a TPM would:
by its public area (TPMT_PUBLIC, TPM 2.0 Part 2 clause 12.2.4) and its *Name*,
``nameAlg || SHA-256(TPMT_PUBLIC)``.  What a quote names as its signer is not the
Name but the *Qualified Name* (TPM 2.0 Part 1, clause 16 "Names"): the Name chained
with the Qualified Names of every ancestor up to the hierarchy,

    QN(hierarchy) = its 4-byte handle                (e.g. TPM_RH_ENDORSEMENT)
    QN(object)    = nameAlg || SHA-256(QN(parent) || Name(object))

so the same key loaded under another parent would sign with another qualifiedSigner.
The model's AK is, like ``tpm2_createak``'s, a child of the endorsement key (EK), a
primary key of the endorsement hierarchy (:func:`ek_public_area`).  The Name covers the object attributes, so a
certificate over the public area also certifies that the key is ``restricted`` —
which is what lets a verifier believe that anything signed with the AK and starting
with TPM_GENERATED_VALUE really came from the TPM.

Signatures are TPMT_SIGNATURE with sigAlg TPM_ALG_ECDSA, hash SHA-256, and R, S as
32-byte TPM2B_ECC_PARAMETERs (left-padded so the encoding is fixed-size).
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import FormatError, SignatureError
from .marshal import Reader, Writer
from .pcr import TPM_ALG_SHA256

TPM_ALG_ECC = 0x0023
TPM_ALG_ECDSA = 0x0018
TPM_ALG_NULL = 0x0010
TPM_ECC_NIST_P256 = 0x0003
ECC_SIZE = 32

# TPMA_OBJECT bits (TPM 2.0 Part 2, Table 31).
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18
#: The usual AK template: a restricted signing key generated inside and bound to the TPM.
AK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
#: Attributes a verifier insists on before it believes a quote signed by the key.
AK_REQUIRED = FIXED_TPM | RESTRICTED | SIGN

# Permanent handles of the hierarchies (TPM 2.0 Part 2, Table 28): their Qualified
# Name is the handle itself.
TPM_RH_OWNER = 0x40000001
TPM_RH_NULL = 0x40000007
TPM_RH_ENDORSEMENT = 0x4000000B
TPM_RH_PLATFORM = 0x4000000C
HIERARCHIES = (TPM_RH_OWNER, TPM_RH_NULL, TPM_RH_ENDORSEMENT, TPM_RH_PLATFORM)

# The EK template (TCG EK Credential Profile 2.0, template L-2, ECC NIST P-256), which is
# also what tpm2_createek -G ecc creates: a restricted decryption (storage) key whose
# authorisation is the endorsement hierarchy's PolicySecret.
TPM_ALG_AES = 0x0006
TPM_ALG_CFB = 0x0043
ADMIN_WITH_POLICY = 1 << 7
EK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
EK_AUTH_POLICY = bytes.fromhex("837197674484B3F81A90CC8D46A5D724FD52D76E06520B64F2A1DA1B331469AA")

MAX_PUBLIC_SIZE = 128  # TPMT_PUBLIC of a P-256 key is 88 bytes
NAME_SIZE = 2 + 32  # nameAlg || SHA-256
SIGNATURE_SIZE = 2 + 2 + 2 + ECC_SIZE + 2 + ECC_SIZE

_CURVE = ec.SECP256R1()


def _ecdsa() -> ec.ECDSA:
    # RFC 6979 deterministic nonces where the OpenSSL build supports them: no
    # dependence on the RNG at signing time (a real TPM uses a random k).
    try:
        return ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    except TypeError:  # pragma: no cover - older cryptography
        return ec.ECDSA(hashes.SHA256())


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def private_to_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(ECC_SIZE, "big")


def private_from_bytes(data: bytes) -> ec.EllipticCurvePrivateKey:
    if len(data) != ECC_SIZE:
        raise FormatError("P-256 private key must be 32 bytes")
    value = int.from_bytes(data, "big")
    try:
        return ec.derive_private_key(value, _CURVE)
    except ValueError as e:
        raise FormatError(f"invalid P-256 private key: {e}") from None


def public_area(key: ec.EllipticCurvePublicKey, attributes: int = AK_ATTRIBUTES) -> bytes:
    """Marshal TPMT_PUBLIC for an ECDSA/SHA-256 P-256 key."""
    nums = key.public_numbers()
    return (
        Writer()
        .u16(TPM_ALG_ECC)  # type
        .u16(TPM_ALG_SHA256)  # nameAlg
        .u32(attributes)  # objectAttributes
        .tpm2b(b"")  # authPolicy (empty: no policy)
        .u16(TPM_ALG_NULL)  # parameters.symmetric: none (signing key)
        .u16(TPM_ALG_ECDSA)  # parameters.scheme
        .u16(TPM_ALG_SHA256)  # parameters.scheme.details.hashAlg
        .u16(TPM_ECC_NIST_P256)  # parameters.curveID
        .u16(TPM_ALG_NULL)  # parameters.kdf
        .tpm2b(nums.x.to_bytes(ECC_SIZE, "big"))  # unique.x
        .tpm2b(nums.y.to_bytes(ECC_SIZE, "big"))  # unique.y
        .bytes()
    )


def parse_public_area(data: bytes) -> tuple[ec.EllipticCurvePublicKey, int]:
    """Parse TPMT_PUBLIC; return (public key, objectAttributes).  Raises FormatError."""
    if len(data) > MAX_PUBLIC_SIZE:
        raise FormatError("TPMT_PUBLIC too large")
    r = Reader(data, "TPMT_PUBLIC")
    r.expect(TPM_ALG_ECC, r.u16("type"), "type")
    r.expect(TPM_ALG_SHA256, r.u16("nameAlg"), "nameAlg")
    attributes = r.u32("objectAttributes")
    r.tpm2b(0, "authPolicy")
    r.expect(TPM_ALG_NULL, r.u16("symmetric"), "symmetric")
    r.expect(TPM_ALG_ECDSA, r.u16("scheme"), "scheme")
    r.expect(TPM_ALG_SHA256, r.u16("scheme.hashAlg"), "scheme.hashAlg")
    r.expect(TPM_ECC_NIST_P256, r.u16("curveID"), "curveID")
    r.expect(TPM_ALG_NULL, r.u16("kdf"), "kdf")
    x = r.tpm2b(ECC_SIZE, "unique.x", exact=ECC_SIZE)
    y = r.tpm2b(ECC_SIZE, "unique.y", exact=ECC_SIZE)
    r.end()
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, b"\x04" + x + y)
    except ValueError:
        raise FormatError("TPMT_PUBLIC: point is not on P-256") from None
    return key, attributes


def name_of(public: bytes) -> bytes:
    """TPM Name of an object: nameAlg || SHA-256(TPMT_PUBLIC)."""
    return TPM_ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(public).digest()


def hierarchy_qualified_name(handle: int) -> bytes:
    """Qualified Name of a hierarchy: its handle, 4 bytes big-endian (Part 1, clause 16)."""
    if handle not in HIERARCHIES:
        raise ValueError(f"0x{handle:08X} is not a hierarchy handle")
    return handle.to_bytes(4, "big")


def check_qualified_name(qn: bytes, what: str = "Qualified Name") -> bytes:
    """A Qualified Name is a hierarchy handle (4 bytes) or 0x000B || SHA-256 (34 bytes)."""
    qn = bytes(qn)
    if len(qn) == 4 and int.from_bytes(qn, "big") in HIERARCHIES:
        return qn
    if len(qn) == NAME_SIZE and qn[:2] == TPM_ALG_SHA256.to_bytes(2, "big"):
        return qn
    raise FormatError(f"{what}: not a hierarchy handle nor a SHA-256 Qualified Name ({qn.hex()})")


def qualified_name(parent_qualified_name: bytes, name: bytes) -> bytes:
    """QN of an object: nameAlg || SHA-256(QN(parent) || Name(object)).

    Both are hashed as their bytes, without size prefixes (the reference
    implementation's ComputeQualifiedName).  Known answer from swtpm in
    tests/tpm/test_tpm_qualified_name.py.
    """
    parent = check_qualified_name(parent_qualified_name, "parent Qualified Name")
    if len(name) != NAME_SIZE or name[:2] != TPM_ALG_SHA256.to_bytes(2, "big"):
        raise FormatError("object Name must be 0x000B || SHA-256 (34 bytes)")
    return TPM_ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(parent + bytes(name)).digest()


def ek_public_area(key: ec.EllipticCurvePublicKey) -> bytes:
    """Marshal the TPMT_PUBLIC of an ECC P-256 endorsement key (template L-2)."""
    nums = key.public_numbers()
    return (
        Writer()
        .u16(TPM_ALG_ECC)
        .u16(TPM_ALG_SHA256)
        .u32(EK_ATTRIBUTES)
        .tpm2b(EK_AUTH_POLICY)
        .u16(TPM_ALG_AES).u16(128).u16(TPM_ALG_CFB)  # parameters.symmetric
        .u16(TPM_ALG_NULL)  # parameters.scheme
        .u16(TPM_ECC_NIST_P256)
        .u16(TPM_ALG_NULL)  # parameters.kdf
        .tpm2b(nums.x.to_bytes(ECC_SIZE, "big"))
        .tpm2b(nums.y.to_bytes(ECC_SIZE, "big"))
        .bytes()
    )


def derive_private_key(seed: bytes, label: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 key derived from a secret seed, the way primary keys come from a
    hierarchy's primary seed (deterministic: the same seed gives the same key).
    Simplified: HMAC-SHA-256 counter mode instead of the TPM's KDFa over the template."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    counter = 0
    while True:
        d = int.from_bytes(
            hmac.new(seed, label + counter.to_bytes(4, "big"), hashlib.sha256).digest(), "big"
        )
        if 0 < d < order:
            return ec.derive_private_key(d, _CURVE)
        counter += 1  # pragma: no cover - probability 2^-32


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-SHA256 over ``message``, marshalled as TPMT_SIGNATURE."""
    r, s = decode_dss_signature(key.sign(message, _ecdsa()))
    return (
        Writer()
        .u16(TPM_ALG_ECDSA)
        .u16(TPM_ALG_SHA256)
        .tpm2b(r.to_bytes(ECC_SIZE, "big"))
        .tpm2b(s.to_bytes(ECC_SIZE, "big"))
        .bytes()
    )


def parse_signature(data: bytes) -> tuple[int, int]:
    """Parse TPMT_SIGNATURE (ECDSA/SHA-256); raises FormatError."""
    r = Reader(data, "TPMT_SIGNATURE")
    r.expect(TPM_ALG_ECDSA, r.u16("sigAlg"), "sigAlg")
    r.expect(TPM_ALG_SHA256, r.u16("hash"), "hash")
    rr = int.from_bytes(r.tpm2b(ECC_SIZE, "signatureR", exact=ECC_SIZE), "big")
    ss = int.from_bytes(r.tpm2b(ECC_SIZE, "signatureS", exact=ECC_SIZE), "big")
    r.end()
    return rr, ss


def verify(key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes, what: str) -> None:
    """Verify a TPMT_SIGNATURE; raise SignatureError (never return False)."""
    try:
        rr, ss = parse_signature(signature)
        key.verify(encode_dss_signature(rr, ss), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, FormatError, ValueError) as e:
        raise SignatureError(f"{what}: signature does not verify ({type(e).__name__})") from None
