"""Named monotonic NV counters (TPM_NT_COUNTER-like).

A TPM NV counter can only be incremented: there is no command to set or decrement
it, so a value it once reported can be relied on never to be seen again.  The
migration protocol uses one per VM as its *epoch*, which is what lets a destination
refuse an old migration stream replayed at it.

This module is the in-memory object and its versioned encoding; ``SoftTpm`` stores it
in ``nvcounters.bin`` under a TPM-internal MAC key, and keeps the counters'
*generation* (bumped by every increment) in its main state file too, so that putting
back an older copy of the counters file is detected (CounterError).  Rolling back
the whole directory at once cannot be detected by software — a real TPM keeps NV
inside the chip for that reason.

Payload (big-endian)::

    u64   generation
    u16   count                  <= 64
    count x { TPM2B name (1..64 bytes, [A-Za-z0-9._:-]), u64 value }   sorted by name

A counter that was never incremented reads as 0; the first increment returns 1.
"""

from __future__ import annotations

import re

from .errors import CounterError, FormatError
from .marshal import Reader, Writer

MAX_COUNTERS = 64
MAX_NAME = 64
MAX_VALUE = 2**64 - 1
_NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
STATE_VERSION = 1


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CounterError(f"bad counter name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ : -")
    return name


class NvCounters:
    def __init__(self, values: dict[str, int] | None = None, generation: int = 0) -> None:
        self._values: dict[str, int] = dict(values or {})
        self.generation = generation

    def read(self, name: str) -> int:
        return self._values.get(check_name(name), 0)

    def increment(self, name: str) -> int:
        check_name(name)
        current = self._values.get(name, 0)
        if name not in self._values and len(self._values) >= MAX_COUNTERS:
            raise CounterError(f"no room for another NV counter ({MAX_COUNTERS} defined)")
        if current >= MAX_VALUE:
            raise CounterError(f"counter {name!r} is exhausted")
        self._values[name] = current + 1
        self.generation += 1
        return current + 1

    def names(self) -> list[str]:
        return sorted(self._values)

    def items(self) -> list[tuple[str, int]]:
        return sorted(self._values.items())

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NvCounters)
            and other._values == self._values
            and other.generation == self.generation
        )

    # -- versioned state ---------------------------------------------------
    def to_bytes(self) -> bytes:
        w = Writer().u16(STATE_VERSION).u64(self.generation).u16(len(self._values))
        for name, value in self.items():
            w.tpm2b(name.encode("ascii"), MAX_NAME).u64(value)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "NvCounters":
        r = Reader(data, "NV counters")
        r.expect(STATE_VERSION, r.u16("version"), "version")
        generation = r.u64("generation")
        count = r.u16("count")
        if count > MAX_COUNTERS:
            raise FormatError(f"NV counters: {count} counters exceeds {MAX_COUNTERS}")
        values: dict[str, int] = {}
        previous = ""
        for _ in range(count):
            raw = r.tpm2b(MAX_NAME, "name")
            try:
                name = check_name(raw.decode("ascii"))
            except (UnicodeDecodeError, CounterError):
                raise FormatError("NV counters: invalid counter name") from None
            if name <= previous:
                raise FormatError("NV counters: names not strictly sorted")
            previous = name
            values[name] = r.u64("value")
        r.end()
        return cls(values, generation)
