"""SHA-256 PCR bank: extend is the only write.

A Platform Configuration Register cannot be set, only *extended*:

    PCR_new = SHA-256(PCR_old || digest)

(TPM 2.0 Part 1, "PCR Extend").  Because SHA-256 is one-way and the old value is
chained in, the final value commits to the whole ordered sequence of digests: no
later extend can bring a PCR back to an earlier or chosen value.  All PCRs start
at 32 zero bytes after a TPM Reset (Startup(CLEAR)), which is why a software TPM's
PCRs are volatile while its keys are not.

A quote does not sign the PCR values themselves but their digest over a selection:

    pcrDigest = SHA-256(PCR[i0] || PCR[i1] || ...)   for i0 < i1 < ... selected

(TPM 2.0 Part 3, TPM2_Quote: the selected PCRs are concatenated in index order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .errors import FormatError
from .marshal import Reader, Writer

#: TPM_ALG_SHA256 (TPM 2.0 Part 2, Table 9).
TPM_ALG_SHA256 = 0x000B
DIGEST_SIZE = 32
#: A PC-Client TPM has 24 PCRs, so a selection bitmap is 3 bytes (sizeofSelect = 3).
NUM_PCRS = 24
PCR_SELECT_SIZE = 3
ZERO_DIGEST = bytes(DIGEST_SIZE)


def extend_value(old: bytes, digest: bytes) -> bytes:
    """PCR extend: SHA-256(old || digest)."""
    if len(old) != DIGEST_SIZE or len(digest) != DIGEST_SIZE:
        raise ValueError("PCR values and extend digests are 32-byte SHA-256 digests")
    return hashlib.sha256(old + digest).digest()


def check_index(index: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < NUM_PCRS:
        raise ValueError(f"PCR index must be an integer 0..{NUM_PCRS - 1}, got {index!r}")
    return index


class PcrSelection:
    """A set of PCR indices of the SHA-256 bank, marshalled as TPMS_PCR_SELECTION.

    The bitmap has PCR n at bit (n % 8) of byte (n // 8) (TPM 2.0 Part 2,
    TPMS_PCR_SELECT), so PCRs 8, 9, 10 are bytes ``00 07 00``.
    """

    __slots__ = ("indices",)

    def __init__(self, indices: Iterable[int]) -> None:
        idx = sorted({check_index(i) for i in indices})
        if not idx:
            raise ValueError("a PCR selection must select at least one PCR")
        self.indices: tuple[int, ...] = tuple(idx)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __contains__(self, index: object) -> bool:
        return index in self.indices

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PcrSelection) and other.indices == self.indices

    def __hash__(self) -> int:
        return hash(self.indices)

    def __repr__(self) -> str:
        return f"PcrSelection({list(self.indices)})"

    def bitmap(self) -> bytes:
        bm = bytearray(PCR_SELECT_SIZE)
        for i in self.indices:
            bm[i // 8] |= 1 << (i % 8)
        return bytes(bm)

    @classmethod
    def from_bitmap(cls, bitmap: bytes) -> "PcrSelection":
        if len(bitmap) != PCR_SELECT_SIZE:
            raise FormatError(f"PCR select bitmap must be {PCR_SELECT_SIZE} bytes")
        idx = [i for i in range(NUM_PCRS) if bitmap[i // 8] >> (i % 8) & 1]
        if not idx:
            raise FormatError("empty PCR selection")
        return cls(idx)

    def marshal_list(self) -> bytes:
        """TPML_PCR_SELECTION with one TPMS_PCR_SELECTION for the SHA-256 bank."""
        return (
            Writer()
            .u32(1)  # count
            .u16(TPM_ALG_SHA256)  # hash
            .u8(PCR_SELECT_SIZE)  # sizeofSelect
            .raw(self.bitmap())  # pcrSelect
            .bytes()
        )

    @classmethod
    def unmarshal_list(cls, r: Reader) -> "PcrSelection":
        """Parse TPML_PCR_SELECTION; only the single-SHA-256-bank form is accepted."""
        r.expect(1, r.u32("pcrSelect.count"), "pcrSelect.count")
        r.expect(TPM_ALG_SHA256, r.u16("pcrSelect.hash"), "pcrSelect.hash")
        r.expect(PCR_SELECT_SIZE, r.u8("pcrSelect.sizeofSelect"), "pcrSelect.sizeofSelect")
        return cls.from_bitmap(r.raw(PCR_SELECT_SIZE, "pcrSelect.pcrSelect"))

    @classmethod
    def parse(cls, text: str) -> "PcrSelection":
        """Parse ``"8,9,10"`` (CLI form)."""
        try:
            return cls(int(p) for p in text.split(",") if p.strip())
        except ValueError as e:
            raise ValueError(f"bad PCR list {text!r}: {e}") from None

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.indices)


def pcr_digest(values: Iterable[bytes]) -> bytes:
    """Digest of PCR values already in index order: SHA-256 of their concatenation."""
    h = hashlib.sha256()
    for v in values:
        if len(v) != DIGEST_SIZE:
            raise ValueError("PCR values are 32 bytes")
        h.update(v)
    return h.digest()


class PcrBank:
    """The 24 SHA-256 PCRs of one TPM.  Volatile: reset to zero on TPM Reset."""

    STATE_VERSION = 1

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = [ZERO_DIGEST] * NUM_PCRS

    def read(self, index: int) -> bytes:
        return self._values[check_index(index)]

    def values(self) -> tuple[bytes, ...]:
        return tuple(self._values)

    def extend(self, index: int, digest: bytes) -> bytes:
        """Extend PCR ``index`` by ``digest``; return the new value."""
        check_index(index)
        self._values[index] = extend_value(self._values[index], digest)
        return self._values[index]

    def reset(self) -> None:
        self._values = [ZERO_DIGEST] * NUM_PCRS

    def digest(self, selection: PcrSelection) -> bytes:
        return pcr_digest(self._values[i] for i in selection)

    # -- versioned state --------------------------------------------------
    def to_bytes(self) -> bytes:
        w = Writer().u16(self.STATE_VERSION).u8(NUM_PCRS)
        for v in self._values:
            w.raw(v)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PcrBank":
        r = Reader(data, "PCR bank")
        r.expect(cls.STATE_VERSION, r.u16("version"), "version")
        r.expect(NUM_PCRS, r.u8("count"), "count")
        bank = cls()
        bank._values = [r.raw(DIGEST_SIZE, "pcr") for _ in range(NUM_PCRS)]
        r.end()
        return bank

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PcrBank) and other._values == self._values
