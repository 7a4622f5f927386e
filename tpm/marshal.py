"""Deterministic big-endian marshalling, TPM 2.0 style (TPM 2.0 Part 2, clause 5).

TPM structures are packed with no padding, integers in network (big-endian) byte
order, and variable-length byte strings as TPM2B: a UINT16 size followed by that
many bytes.  Parsing is *bounded*: every length field is checked against both a
structure-specific maximum and the bytes actually remaining, before anything is
sliced, so a hostile length can neither read past the buffer nor allocate much.

Every parse failure raises :class:`tpm.errors.FormatError`; the public entry points
re-raise it as the specific subclass for their input (``QuoteFormatError``,
``CorruptStateError`` ...).

``little_endian=True`` gives the same bounded cursor in the byte order of the TCG PC
Client event log, which is little-endian (it is written by x86 firmware, not by the
TPM): see :mod:`tpm.eventlog`.
"""

from __future__ import annotations

import struct

from .errors import FormatError


class Writer:
    """Append-only builder for a marshalled structure."""

    __slots__ = ("_parts", "_order")

    def __init__(self, little_endian: bool = False) -> None:
        self._parts: list[bytes] = []
        self._order = "<" if little_endian else ">"

    def u8(self, value: int) -> "Writer":
        self._parts.append(struct.pack(">B", value))
        return self

    def u16(self, value: int) -> "Writer":
        self._parts.append(struct.pack(self._order + "H", value))
        return self

    def u32(self, value: int) -> "Writer":
        self._parts.append(struct.pack(self._order + "I", value))
        return self

    def u64(self, value: int) -> "Writer":
        self._parts.append(struct.pack(self._order + "Q", value))
        return self

    def raw(self, data: bytes) -> "Writer":
        self._parts.append(bytes(data))
        return self

    def tpm2b(self, data: bytes, max_size: int = 0xFFFF) -> "Writer":
        """TPM2B: UINT16 size then the bytes."""
        if len(data) > max_size:
            raise ValueError(f"TPM2B of {len(data)} bytes exceeds its bound {max_size}")
        self.u16(len(data))
        self._parts.append(bytes(data))
        return self

    def blob32(self, data: bytes, max_size: int) -> "Writer":
        """Like TPM2B but with a UINT32 size, for containers larger than 64 KiB."""
        if len(data) > max_size:
            raise ValueError(f"blob of {len(data)} bytes exceeds its bound {max_size}")
        self.u32(len(data))
        self._parts.append(bytes(data))
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)


_INTS = {(order, code): struct.Struct(order + code) for order in "<>" for code in "HIQ"}


class Reader:
    """Bounded cursor over a byte string.  Every read checks what remains."""

    __slots__ = ("_data", "_pos", "_what", "_order")

    def __init__(self, data: bytes, what: str = "structure", little_endian: bool = False) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what
        self._order = "<" if little_endian else ">"

    @property
    def offset(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    # (Written for speed as well as bounds: a verifier parses ~100 fields per
    # quote, twice per handshake, on the migration's critical path.)
    def _take(self, n: int, field: str) -> bytes:
        pos = self._pos
        end = pos + n
        if n < 0 or end > len(self._data):
            raise FormatError(
                f"{self._what}: truncated at {field} (need {n} bytes at offset "
                f"{pos}, have {self.remaining})"
            )
        self._pos = end
        return self._data[pos:end]

    def _int(self, fmt: struct.Struct, field: str) -> int:
        pos = self._pos
        end = pos + fmt.size
        if end > len(self._data):
            self._take(fmt.size, field)         # raises, naming the field
        self._pos = end
        return fmt.unpack_from(self._data, pos)[0]

    def u8(self, field: str = "u8") -> int:
        return self._take(1, field)[0]

    def u16(self, field: str = "u16") -> int:
        return self._int(_INTS[self._order, "H"], field)

    def u32(self, field: str = "u32") -> int:
        return self._int(_INTS[self._order, "I"], field)

    def u64(self, field: str = "u64") -> int:
        return self._int(_INTS[self._order, "Q"], field)

    def raw(self, n: int, field: str = "bytes") -> bytes:
        return self._take(n, field)

    def tpm2b(self, max_size: int, field: str = "TPM2B", exact: int | None = None) -> bytes:
        """Read a TPM2B, refusing a size above ``max_size`` (or other than ``exact``)."""
        size = self.u16(field + ".size")
        if size > max_size:
            raise FormatError(f"{self._what}: {field} size {size} exceeds bound {max_size}")
        if exact is not None and size != exact:
            raise FormatError(f"{self._what}: {field} size {size}, expected {exact}")
        return self._take(size, field)

    def blob32(self, max_size: int, field: str = "blob") -> bytes:
        size = self.u32(field + ".size")
        if size > max_size:
            raise FormatError(f"{self._what}: {field} size {size} exceeds bound {max_size}")
        return self._take(size, field)

    def expect(self, value: int, got: int, field: str) -> None:
        if value != got:
            raise FormatError(f"{self._what}: {field} is 0x{got:X}, expected 0x{value:X}")

    def end(self) -> None:
        """Refuse trailing bytes: a structure has exactly one encoding."""
        if self.remaining:
            raise FormatError(f"{self._what}: {self.remaining} trailing bytes")
