"""The evidence bundle: what a host sends a verifier in answer to a nonce.

A quote alone is not enough to judge a host: the verifier also needs the event log
(to learn *what* the PCRs measure) and the AK certificate (to learn whether to believe
the signature at all).  The bundle carries the three, unaltered, next to the exact
TPMS_ATTEST bytes that were signed (the verifier checks the signature over those
bytes, never over a re-marshalled copy).

Layout (big-endian)::

    u32    magic         0x4D565142 ("MVQB")
    u16    version       2
    TPM2B  attest        TPMS_ATTEST, <= 177 bytes (see tpm.quote)
    TPM2B  signature     TPMT_SIGNATURE by the AK over attest, 72 bytes
    TPM2B  akCert        AkCertificate (see tpm.issuer); empty if the AK is uncertified
    u32+n  eventLog      TCG crypto-agile event log (see tpm.eventlog), <= MAX_EVENTLOG_BYTES

Version 2: the event log is the TCG PC Client format and the AK certificate names the
AK's parent (version 1 carried minivmm's own "MVEL" log and is refused).

Parsing checks every length against its bound before use and refuses trailing
bytes; every failure, whatever the inner structure, is a QuoteFormatError.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import keys
from .errors import FormatError, QuoteFormatError
from .eventlog import MAX_EVENTLOG_BYTES, EventLog
from .issuer import MAX_CERT_SIZE, AkCertificate
from .marshal import Reader, Writer
from .quote import MAX_ATTEST_SIZE, Attest

EVIDENCE_MAGIC = 0x4D565142  # "MVQB"
EVIDENCE_VERSION = 2
MAX_EVIDENCE_SIZE = 6 + 2 + MAX_ATTEST_SIZE + 2 + keys.SIGNATURE_SIZE + 2 + MAX_CERT_SIZE + 4 + MAX_EVENTLOG_BYTES


@dataclass(frozen=True)
class Evidence:
    attest_bytes: bytes
    signature: bytes
    certificate_bytes: bytes
    eventlog_bytes: bytes
    # Parsed views (derived from the bytes above by from_bytes/build).
    attest: Attest
    certificate: AkCertificate | None
    event_log: EventLog

    @classmethod
    def build(
        cls, attest_bytes: bytes, signature: bytes, certificate: AkCertificate | None, log: EventLog
    ) -> "Evidence":
        cert_bytes = certificate.to_bytes() if certificate is not None else b""
        return cls.from_bytes(
            _marshal(attest_bytes, signature, cert_bytes, log.to_bytes())
        )

    @staticmethod
    def encode(attest_bytes: bytes, signature: bytes, certificate_bytes: bytes, eventlog_bytes: bytes) -> bytes:
        """The wire encoding of the four parts, not parsed back (``build`` parses it)."""
        return _marshal(attest_bytes, signature, certificate_bytes, eventlog_bytes)

    def to_bytes(self) -> bytes:
        return _marshal(self.attest_bytes, self.signature, self.certificate_bytes, self.eventlog_bytes)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Evidence":
        try:
            if not isinstance(data, (bytes, bytearray)):
                raise FormatError("evidence must be bytes")
            if len(data) > MAX_EVIDENCE_SIZE:
                raise FormatError(f"evidence of {len(data)} bytes exceeds {MAX_EVIDENCE_SIZE}")
            r = Reader(data, "evidence")
            r.expect(EVIDENCE_MAGIC, r.u32("magic"), "magic")
            r.expect(EVIDENCE_VERSION, r.u16("version"), "version")
            attest_bytes = r.tpm2b(MAX_ATTEST_SIZE, "attest")
            signature = r.tpm2b(keys.SIGNATURE_SIZE, "signature")
            cert_bytes = r.tpm2b(MAX_CERT_SIZE, "akCert")
            log_bytes = r.blob32(MAX_EVENTLOG_BYTES, "eventLog")
            r.end()
            attest = Attest.from_bytes(attest_bytes)
            keys.parse_signature(signature)
            cert = AkCertificate.from_bytes(cert_bytes) if cert_bytes else None
            log = EventLog.from_bytes(log_bytes)
        except QuoteFormatError:
            raise
        except FormatError as e:
            raise QuoteFormatError(str(e)) from None
        return cls(attest_bytes, signature, cert_bytes, log_bytes, attest, cert, log)


def _marshal(attest: bytes, signature: bytes, cert: bytes, log: bytes) -> bytes:
    return (
        Writer()
        .u32(EVIDENCE_MAGIC)
        .u16(EVIDENCE_VERSION)
        .tpm2b(attest, MAX_ATTEST_SIZE)
        .tpm2b(signature, keys.SIGNATURE_SIZE)
        .tpm2b(cert, MAX_CERT_SIZE)
        .blob32(log, MAX_EVENTLOG_BYTES)
        .bytes()
    )
