"""The local issuer ("privacy CA") and the attestation-key certificate.

A quote is only as good as the verifier's reason to believe the signing key lives
in a real TPM.  In TPM deployments that reason is a certificate from an issuer the
verifier already trusts (a privacy CA that checked the AK with credential
activation).  Here the issuer is a P-256 key in its own directory; an instructor can
create one and certify the AKs of several host TPMs with it, and every verifier is
configured with the issuer's *public* key as its trust anchor.

Issuer directory::

    issuer.bin       state envelope "MVIS" v1: TPM2B name, TPM2B private scalar
    issuer.pub.pem   the public key (SubjectPublicKeyInfo PEM) — give this to verifiers

AK certificate (``AkCertificate``), big-endian, every field bounded::

    u32   magic        0x4D564143 ("MVAC")
    u16   version      2
    32    issuerKeyId  SHA-256(DER SubjectPublicKeyInfo of the issuer key)
    TPM2B subject      UTF-8 host label, <= 64 bytes
    TPM2B akPublic     TPMT_PUBLIC of the AK, <= 128 bytes
    TPM2B parentQN     Qualified Name of the AK's parent: 4 (a hierarchy handle) or 34 bytes
    TPM2B signature    TPMT_SIGNATURE by the issuer over all bytes above

The parent's Qualified Name is what lets a verifier compute the AK's own Qualified
Name, which a TPM writes as a quote's qualifiedSigner (see :mod:`tpm.keys`).
Version 1 certificates (no parentQN) still parse, so old TPM state directories
open, but a verifier refuses them: re-certify (``minivmm-tpm init --issuer``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import keys, statefile
from .errors import CertificateError, CorruptStateError, FormatError
from .marshal import Reader, Writer

ISSUER_FILE = "issuer.bin"
ISSUER_PUB_FILE = "issuer.pub.pem"
ISSUER_MAGIC = 0x4D564953  # "MVIS"
ISSUER_VERSION = 1
CERT_MAGIC = 0x4D564143  # "MVAC"
CERT_VERSION = 2
CERT_VERSION_NO_PARENT = 1
MAX_LABEL = 64
MAX_CERT_SIZE = 4 + 2 + 32 + 2 + MAX_LABEL + 2 + keys.MAX_PUBLIC_SIZE + 2 + keys.NAME_SIZE + 2 + keys.SIGNATURE_SIZE
#: Default parent of a certified AK: the endorsement hierarchy itself (a primary AK).
ENDORSEMENT_QN = keys.hierarchy_qualified_name(keys.TPM_RH_ENDORSEMENT)


def key_id(public: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how certificates name their issuer."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _check_label(label: str) -> bytes:
    raw = label.encode("utf-8")
    if len(raw) > MAX_LABEL:
        raise ValueError(f"label longer than {MAX_LABEL} bytes")
    return raw


@dataclass(frozen=True)
class AkCertificate:
    issuer_key_id: bytes
    subject: str
    ak_public: bytes
    signature: bytes
    #: Qualified Name of the AK's parent (empty only in a version 1 certificate).
    parent_qualified_name: bytes = ENDORSEMENT_QN
    version: int = CERT_VERSION

    def tbs(self) -> bytes:
        """The to-be-signed part: everything before the signature."""
        w = (
            Writer()
            .u32(CERT_MAGIC)
            .u16(self.version)
            .raw(self.issuer_key_id)
            .tpm2b(_check_label(self.subject), MAX_LABEL)
            .tpm2b(self.ak_public, keys.MAX_PUBLIC_SIZE)
        )
        if self.version == CERT_VERSION:
            w.tpm2b(self.parent_qualified_name, keys.NAME_SIZE)
        return w.bytes()

    def to_bytes(self) -> bytes:
        return Writer().raw(self.tbs()).tpm2b(self.signature, keys.SIGNATURE_SIZE).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AkCertificate":
        if len(data) > MAX_CERT_SIZE:
            raise FormatError("AK certificate too large")
        r = Reader(data, "AK certificate")
        r.expect(CERT_MAGIC, r.u32("magic"), "magic")
        version = r.u16("version")
        if version not in (CERT_VERSION, CERT_VERSION_NO_PARENT):
            raise FormatError(f"AK certificate: version {version} (expected {CERT_VERSION})")
        issuer_id = r.raw(32, "issuerKeyId")
        try:
            subject = r.tpm2b(MAX_LABEL, "subject").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("AK certificate: subject is not UTF-8") from None
        ak_public = r.tpm2b(keys.MAX_PUBLIC_SIZE, "akPublic")
        parent = b""
        if version == CERT_VERSION:
            parent = keys.check_qualified_name(
                r.tpm2b(keys.NAME_SIZE, "parentQualifiedName"), "AK certificate: parentQN"
            )
        signature = r.tpm2b(keys.SIGNATURE_SIZE, "signature")
        r.end()
        return cls(issuer_id, subject, ak_public, signature, parent, version)

    @property
    def ak_name(self) -> bytes:
        return keys.name_of(self.ak_public)

    @property
    def ak_qualified_name(self) -> bytes:
        """The Qualified Name the certified AK signs quotes with (its qualifiedSigner).
        FormatError for a version 1 certificate, which does not name the parent."""
        if self.version != CERT_VERSION:
            raise FormatError("version 1 AK certificate does not name the AK's parent")
        return keys.qualified_name(self.parent_qualified_name, self.ak_name)


class Issuer:
    """A certificate issuer for attestation keys, persisted in its own directory."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, name: str, directory: Path | None = None):
        _check_label(name)
        self._key = private_key
        self.name = name
        self.directory = directory

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def certify(
        self, ak_public: bytes, subject: str, *, parent_qualified_name: bytes = ENDORSEMENT_QN
    ) -> AkCertificate:
        """Certify an AK public area, loaded under the parent whose Qualified Name is
        given (default: a primary AK of the endorsement hierarchy).  Refuses keys that
        are not restricted signing keys: an unrestricted key could sign forged
        TPMS_ATTEST structures."""
        try:
            _, attributes = keys.parse_public_area(ak_public)
            parent = keys.check_qualified_name(parent_qualified_name, "parent Qualified Name")
        except FormatError as e:
            raise CertificateError(f"refusing to certify: {e}") from None
        if attributes & keys.AK_REQUIRED != keys.AK_REQUIRED:
            raise CertificateError("refusing to certify: key is not a fixedTPM restricted signing key")
        unsigned = AkCertificate(self.key_id, subject, ak_public, b"", parent)
        return replace(unsigned, signature=keys.sign(self._key, unsigned.tbs()))

    # -- state -------------------------------------------------------------
    def to_state(self) -> bytes:
        return (
            Writer()
            .tpm2b(_check_label(self.name), MAX_LABEL)
            .tpm2b(keys.private_to_bytes(self._key), keys.ECC_SIZE)
            .bytes()
        )

    @classmethod
    def from_state(cls, payload: bytes, directory: Path | None = None) -> "Issuer":
        r = Reader(payload, "issuer state")
        name = r.tpm2b(MAX_LABEL, "name").decode("utf-8", errors="strict")
        key = keys.private_from_bytes(r.tpm2b(keys.ECC_SIZE, "privateKey", exact=keys.ECC_SIZE))
        r.end()
        return cls(key, name, directory)

    @classmethod
    def create(cls, directory: Path | str, name: str = "minivmm-issuer") -> "Issuer":
        """Create a new issuer in ``directory`` (which must not already hold one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / ISSUER_FILE).exists():
            raise FileExistsError(f"{directory / ISSUER_FILE} already exists")
        issuer = cls(keys.generate_private_key(), name, directory)
        statefile.write(directory / ISSUER_FILE, ISSUER_MAGIC, ISSUER_VERSION, issuer.to_state())
        statefile.atomic_write_bytes(directory / ISSUER_PUB_FILE, issuer.public_pem(), mode=0o644)
        return issuer

    @classmethod
    def load(cls, directory: Path | str) -> "Issuer":
        directory = Path(directory)
        path = directory / ISSUER_FILE
        payload = statefile.read(path, ISSUER_MAGIC, ISSUER_VERSION, 256)
        try:
            return cls.from_state(payload, directory)
        except (FormatError, UnicodeDecodeError) as e:
            raise CorruptStateError(path, str(e)) from None

    @classmethod
    def open(cls, directory: Path | str, name: str = "minivmm-issuer") -> "Issuer":
        """Load the issuer in ``directory``, creating it on first use."""
        directory = Path(directory)
        if (directory / ISSUER_FILE).exists():
            return cls.load(directory)
        return cls.create(directory, name)


def load_trust_anchor(path: Path | str) -> ec.EllipticCurvePublicKey:
    """Load an issuer public key: a PEM file, or an issuer directory's issuer.pub.pem."""
    path = Path(path)
    if path.is_dir():
        path = path / ISSUER_PUB_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(4096 + 1)
    except OSError as e:
        raise CorruptStateError(path, f"unreadable: {e.strerror}") from None
    if len(data) > 4096:
        raise CorruptStateError(path, "too large for a public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise CorruptStateError(path, f"not a PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CorruptStateError(path, "issuer key must be ECDSA P-256")
    return key
