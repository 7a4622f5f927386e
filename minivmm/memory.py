"""Guest RAM: one host buffer, mapped into Unicorn with ``mem_map_ptr``.

The VMM, the migration engine and the TUI read guest RAM through this buffer
without copying.  Writes the VMM makes here bypass Unicorn's TLB, hence the
write-protect dirty log (``minivmm.dirtylog``): :meth:`write` marks the pages
it touches, or a live migration would silently lose them (DESIGN §8).
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import numpy as np

from minivmm.abi import PAGE_SIZE
from minivmm.dirtylog import DirtyLog
from minivmm.errors import VmmError

MIN_RAM = 16 << 20
MAX_RAM = 256 << 20


class GuestRAM:
    def __init__(self, size: int, mapping: mmap.mmap | None = None):
        """``mapping``: an anonymous mapping of exactly ``size`` bytes, all zero, to
        use instead of a new one (a migration destination's RAM backed ahead
        of time: ``migrate/reserve.py``)."""
        if size % PAGE_SIZE or not MIN_RAM <= size <= MAX_RAM:
            raise VmmError(f"guest RAM must be a page multiple in [{MIN_RAM >> 20}, "
                           f"{MAX_RAM >> 20}] MiB, not {size} bytes")
        if mapping is not None and len(mapping) != size:
            raise VmmError(f"a mapping of {len(mapping)} bytes cannot hold {size} bytes of guest RAM")
        self.size = size
        self._map = mapping if mapping is not None else \
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # zero-filled
        self._cbuf = (ctypes.c_ubyte * size).from_buffer(self._map)
        self.view = memoryview(self._map)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.dirty = DirtyLog(size // PAGE_SIZE)

    @property
    def host_address(self) -> int:
        return ctypes.addressof(self._cbuf)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    def _check(self, paddr: int, length: int) -> None:
        if paddr < 0 or length < 0 or paddr + length > self.size:
            raise VmmError(f"physical access [{paddr:#x}, {paddr + length:#x}) outside "
                           f"guest RAM of {self.size:#x} bytes")

    def read(self, paddr: int, length: int) -> bytes:
        self._check(paddr, length)
        return bytes(self.view[paddr:paddr + length])

    def write(self, paddr: int, data: bytes) -> None:
        self._check(paddr, len(data))
        # Logged before the bytes land: a reader on another thread (live
        # migration's sender) that copies the new bytes then sees the bit.
        if data:
            self.dirty.mark_range(paddr, len(data))
        self.view[paddr:paddr + len(data)] = data

    def u32(self, paddr: int) -> int:
        self._check(paddr, 4)
        return struct.unpack_from("<I", self.view, paddr)[0]

    def set_u32(self, paddr: int, value: int) -> None:
        self.write(paddr, struct.pack("<I", value & 0xFFFFFFFF))

    def page(self, pfn: int) -> memoryview:
        return self.view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
