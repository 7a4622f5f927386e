"""The data path's reference: a migration's per-byte work with nothing else.

The loopback ceiling (``bench.loopback_ceiling``) sends one 1 MiB buffer again
and again into another 1 MiB buffer: both stay in the CPU's caches, and
neither side does anything but the kernel's copy.  A migration of a guest
whose RAM is full must do more per byte, by design, whatever else it does:

* source, plain: copy each record's pages out of guest RAM into the record
  buffer (the private copy: the bytes digested must be the bytes sent while
  the guest writes), a GMAC over it (the completeness digest,
  ``migrate/digest.py``), then send;
* source, secure: AES-256-GCM straight from guest RAM into the send buffer
  (the sealed channel, ``migrate/secure/channel.py``: the tag is over the
  ciphertext as sent, so no private copy), then send;
* destination: receive into guest RAM and a GMAC over it (plain), or receive
  the ciphertext into guest RAM and decrypt it there in place, the tag
  checked (secure); RAM backed beforehand, as ``serve --reserve-ram`` does.

:func:`datapath_rate` does exactly that, in 1 MiB records between this
process and a child over loopback TCP, with the engine's primitives and none
of its other work: no guest, no per-page or per-record bookkeeping, no
protocol.  So in the benchmark report the migration's throughput against
this figure is the engine's own efficiency, and this figure against the
loopback ceiling is what the per-byte work costs on this machine.  The child
proves it did the work: it returns a digest of every tag it computed (plain)
or checked (secure), which the parent compares with its own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import numpy as np

RECORD = 1 << 20
KINDS = ("plain", "secure")

_SINK = r'''
import hashlib, mmap, socket, sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
kind, total, key = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.stdin.readline().strip())
REC = 1 << 20
ram = mmap.mmap(-1, total)
ram.write(b"\1" * total)                       # backed before the first byte arrives
view, tag = memoryview(ram), memoryview(bytearray(16))
s = socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
c, _ = s.accept()
def fill(buf):
    got = 0
    while got < len(buf):
        k = c.recv_into(buf[got:])
        if not k:
            raise EOFError("sender closed early")
        got += k
tags = hashlib.sha256()
for i, off in enumerate(range(0, total, REC)):
    nonce = i.to_bytes(12, "big")
    dst = view[off:off + REC]
    if kind == "plain":
        fill(dst)
        g = Cipher(algorithms.AES(bytes(16)), modes.GCM(nonce)).encryptor()
        g.authenticate_additional_data(dst)
        g.finalize()
        tags.update(g.tag)
    else:
        fill(dst); fill(tag)
        d = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
        d.update_into(dst, dst)
        d.finalize_with_tag(bytes(tag))        # raises on a wrong byte
        tags.update(tag)
c.sendall(tags.hexdigest().encode()); c.close()
'''


class DatapathError(RuntimeError):
    """The child did not confirm the bytes it was sent."""


def datapath_rate(kind: str, total: int = 256 << 20, *, ram: np.ndarray | None = None) -> float:
    """Bytes per second of ``kind``'s per-byte work (see the module's
    docstring) from this process to a child over loopback TCP.  ``ram``: the
    source's bytes (``total`` of them, uint8); random if not given."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if total <= 0 or total % RECORD:
        raise ValueError(f"total of {total} bytes: a positive multiple of {RECORD}")
    if ram is None:
        ram = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
    pages = memoryview(ram).cast("B")[:total]
    key = os.urandom(32)
    aead, gmac = AESGCM(key), AESGCM(bytes(16))
    body = bytearray(RECORD)
    sealed = bytearray(RECORD + 16)
    tags = hashlib.sha256()
    child = subprocess.Popen([sys.executable, "-c", _SINK, kind, str(total)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got, t0 = "(the child named no port)", time.perf_counter()
    try:
        try:
            child.stdin.write(key.hex() + "\n")
            child.stdin.flush()
        except OSError:                 # it exited already: no port below, its stderr says why
            pass
        line = child.stdout.readline().strip()
        try:
            if not line.isdigit():
                raise ConnectionRefusedError(f"no port from the child: {line[:40]!r}")
            with socket.create_connection(("127.0.0.1", int(line))) as sock:
                t0 = time.perf_counter()
                for i, off in enumerate(range(0, total, RECORD)):
                    nonce = i.to_bytes(12, "big")
                    if kind == "plain":
                        body[:] = pages[off:off + RECORD]               # the private copy
                        tags.update(gmac.encrypt(nonce, b"", body))     # GMAC: pages as associated data
                        sock.sendall(body)
                    else:
                        aead.encrypt_into(nonce, pages[off:off + RECORD], None, sealed)
                        tags.update(sealed[RECORD:])
                        sock.sendall(sealed)
                sock.shutdown(socket.SHUT_WR)
                got = b"".join(iter(lambda: sock.recv(64), b"")).decode(errors="replace")   # to its close
        except OSError as exc:          # the child stopped reading: it says why on stderr
            got = f"(connection: {exc})"
        elapsed = time.perf_counter() - t0
    finally:
        _, err = child.communicate(timeout=60)
    if got != tags.hexdigest():
        last = (err.strip().splitlines() or ["nothing on stderr"])[-1]
        raise DatapathError(f"{kind} data path: the child's tags do not match ({got[:40]!r}); "
                            f"exit status {child.returncode}: {last}")
    return total / elapsed
