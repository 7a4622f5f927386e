"""Guest RAM backed before a migration arrives (``serve --reserve-ram MIB``).

A destination must write every page it receives into RAM the host has to
back first: allocate, and zero, a frame for each.  Profiled on the 256 MiB
full-RAM guest, that was the largest cost of the whole migration here:
``clear_page`` on the destination, 30 ms to over 1 s per 256 MiB (this host
is itself a VM whose freed memory goes back to its hypervisor, so fresh
memory faults twice), paid inside pre-copy by the receive loop and the
prefault thread.  A QEMU destination has the same cost unless its guest RAM
is allocated (``-mem-prealloc``) before the source starts; this is that.

:class:`RamReserve` maps and backs one region of ``size`` bytes (2 MiB pages,
``MADV_POPULATE_WRITE``) on a thread while the server waits.  An incoming
migration of at most that size takes it (``take``): the region is shrunk in
place to the guest's size (the tail goes back to the host) and becomes its
``GuestRAM``; it is all zero, exactly like a fresh mapping, since nothing
ever wrote to it.  ``refill`` backs a new one after the session.  If the
region is not wholly backed yet when a migration arrives, the migration
takes what there is and the destination's prefault thread backs the rest, as
without a reserve.  The cost: ``size`` bytes of host memory held while the
server is idle.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

from migrate.residency import MADV_HUGEPAGE, MADV_POPULATE_WRITE, PAGE_SIZE, _madvise

STEP = 2 << 20          # backed per call: a take() waits at most one step
# The backing thread's nice value: a refill runs while the received guest runs,
# and in the benchmark while another destination receives; it must not take a
# core from either (10: a tenth of a normal thread's share when they compete).
BACKGROUND_NICE = 10


def _address(m: mmap.mmap) -> int:
    probe = (ctypes.c_ubyte * 1).from_buffer(m)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe       # no export may outlive this: take() resizes the mapping


class RamReserve:
    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"reserve of {size} bytes: a positive page multiple is needed")
        self.size = size
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._backed = 0                # bytes of _map backed so far
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.refill()

    def refill(self) -> None:
        """Start backing a new region unless one is there (or being made)."""
        with self._lock:
            if self._closed or self._map is not None or (self._thread and self._thread.is_alive()):
                return
            self._stop.clear()
            try:
                self._map, self._backed = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), 0
            except (OSError, ValueError):       # an optimisation: without it, fresh RAM as before
                return
            self._thread = threading.Thread(target=self._back, args=(self._map,), name="reserve-ram", daemon=True)
            self._thread.start()

    def _back(self, m: mmap.mmap) -> None:
        madvise = _madvise()
        if madvise is None:
            return
        try:        # background work: yield to guests and migrations (Linux: nice is per thread)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except (OSError, AttributeError):
            pass
        base = _address(m)
        madvise(ctypes.c_void_p(base), ctypes.c_size_t(self.size), MADV_HUGEPAGE)
        for off in range(0, self.size, STEP):
            if self._stop.is_set():
                return
            n = min(STEP, self.size - off)
            if madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(n), MADV_POPULATE_WRITE):
                return          # not supported here: the destination's prefault thread does it
            self._backed = off + n

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the region being made is wholly backed (or backing
        stopped); whether it is."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._map is not None and self._backed >= self.size

    def take(self, size: int) -> tuple[mmap.mmap | None, bool]:
        """(a zero mapping of exactly ``size`` bytes, whether it is wholly
        backed), or (None, False) if there is none or it is too small."""
        with self._lock:
            m, thread = self._map, self._thread
            if m is None or size > self.size:
                return None, False
            self._map = None
            self._stop.set()
        if thread is not None:
            thread.join()       # stops after its current 2 MiB step
        backed = self._backed >= size
        if size < len(m):
            try:
                m.resize(size)      # shrinks in place (mremap): the tail goes back to the host
            except (OSError, ValueError, SystemError):     # no mremap here: fresh RAM as before
                m.close()
                return None, False
        return m, backed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop.set()
            m, thread, self._map = self._map, self._thread, None
        if thread is not None:
            thread.join()
        if m is not None:
            m.close()
