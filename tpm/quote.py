"""TPMS_ATTEST for a quote (TPM 2.0 Part 2, clause 10.12.12) and the signed quote.

Byte layout (big-endian, no padding)::

    u32    magic             TPM_GENERATED_VALUE = 0xFF544347
    u16    type              TPM_ST_ATTEST_QUOTE = 0x8018
    TPM2B  qualifiedSigner   Qualified Name of the AK (34 bytes; see tpm.keys):
                             0x000B || SHA-256(QN(parent) || Name(AK))
    TPM2B  extraData         the verifier's nonce (qualifying data), <= 64 bytes
    TPMS_CLOCK_INFO clockInfo
        u64  clock           ms the TPM has been running (persisted across restarts)
        u32  resetCount      number of TPM Resets (power cycles: PCRs cleared)
        u32  restartCount    TPM Restarts/Resumes since the last reset
        u8   safe            1: clock has not gone backwards
    u64    firmwareVersion
    TPMS_QUOTE_INFO attested
        TPML_PCR_SELECTION pcrSelect
            u32 count = 1
            u16 hash  = 0x000B (SHA-256)
            u8  sizeofSelect = 3
            u8[3] pcrSelect  bitmap, PCR n = bit (n % 8) of byte (n // 8)
        TPM2B  pcrDigest     SHA-256 over the selected PCR values in index order (32 bytes)

The magic is what makes a restricted key meaningful: the TPM writes it at the start
of every structure it signs itself, and refuses to sign external data that begins
with it, so a verifier knows a signed blob starting with the magic is the TPM's own
report and not something a caller asked it to sign.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import FormatError, QuoteFormatError
from .marshal import Reader, Writer
from .pcr import DIGEST_SIZE, PcrSelection

TPM_GENERATED_VALUE = 0xFF544347
TPM_GENERATED_BYTES = TPM_GENERATED_VALUE.to_bytes(4, "big")
TPM_ST_ATTEST_QUOTE = 0x8018
NAME_SIZE = 34
MAX_EXTRA_DATA = 64  # sizeof(TPMU_HA): TPM2B_DATA's bound
#: minivmm's firmware version as reported in every quote ("MV" 0.1).
FIRMWARE_VERSION = 0x4D56_0000_0001_0000
MAX_ATTEST_SIZE = 4 + 2 + 2 + NAME_SIZE + 2 + MAX_EXTRA_DATA + 17 + 8 + 10 + 2 + DIGEST_SIZE


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    def marshal(self, w: Writer) -> None:
        w.u64(self.clock).u32(self.reset_count).u32(self.restart_count).u8(1 if self.safe else 0)

    @classmethod
    def unmarshal(cls, r: Reader) -> "ClockInfo":
        clock = r.u64("clockInfo.clock")
        reset = r.u32("clockInfo.resetCount")
        restart = r.u32("clockInfo.restartCount")
        safe = r.u8("clockInfo.safe")
        if safe > 1:
            raise FormatError(f"TPMS_ATTEST: clockInfo.safe is {safe}, not a TPMI_YES_NO")
        return cls(clock, reset, restart, bool(safe))


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    selection: PcrSelection
    pcr_digest: bytes

    def to_bytes(self) -> bytes:
        w = Writer().u32(TPM_GENERATED_VALUE).u16(TPM_ST_ATTEST_QUOTE)
        w.tpm2b(self.qualified_signer, NAME_SIZE)
        w.tpm2b(self.extra_data, MAX_EXTRA_DATA)
        self.clock_info.marshal(w)
        w.u64(self.firmware_version)
        w.raw(self.selection.marshal_list())
        w.tpm2b(self.pcr_digest, DIGEST_SIZE)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Attest":
        """Parse; any malformation raises QuoteFormatError."""
        try:
            if len(data) > MAX_ATTEST_SIZE:
                raise FormatError(f"TPMS_ATTEST of {len(data)} bytes exceeds {MAX_ATTEST_SIZE}")
            r = Reader(data, "TPMS_ATTEST")
            r.expect(TPM_GENERATED_VALUE, r.u32("magic"), "magic")
            r.expect(TPM_ST_ATTEST_QUOTE, r.u16("type"), "type")
            signer = r.tpm2b(NAME_SIZE, "qualifiedSigner", exact=NAME_SIZE)
            extra = r.tpm2b(MAX_EXTRA_DATA, "extraData")
            clock = ClockInfo.unmarshal(r)
            fw = r.u64("firmwareVersion")
            selection = PcrSelection.unmarshal_list(r)
            digest = r.tpm2b(DIGEST_SIZE, "pcrDigest", exact=DIGEST_SIZE)
            r.end()
        except FormatError as e:
            raise QuoteFormatError(str(e)) from None
        return cls(signer, extra, clock, fw, selection, digest)


def bind_nonce(nonce: bytes, binding: bytes) -> bytes:
    """Qualifying data that binds a verifier nonce to extra context (e.g. the hash of
    a key-exchange transcript): SHA-256("minivmm-quote-binding\\0" || u16 len || nonce
    || binding).  Pass the result as the quote's nonce and as ``expected_nonce``."""
    if len(nonce) > 0xFFFF:
        raise ValueError("nonce too long")
    return hashlib.sha256(
        b"minivmm-quote-binding\0" + len(nonce).to_bytes(2, "big") + nonce + binding
    ).digest()
