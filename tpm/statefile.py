"""Versioned, checked, atomically written state files.

Every file a TPM or issuer directory holds has the same envelope (Firecracker's
snapshot rule: check size, magic, version and checksum *before* parsing):

    offset  size  field
    0       4     magic      (u32, identifies the file kind, e.g. "MVTS")
    4       2     version    (u16, format version of the payload)
    6       4     length     (u32, payload length, bounded per file kind)
    10      n     payload
    10+n    32    trailer    SHA-256(header || payload), or HMAC-SHA-256 under a
                             TPM-internal key for files the TPM alone may write

Any failure raises :class:`CorruptStateError` naming the file.  Writes go to a
temporary file in the same directory, are fsync'd, then ``os.replace``d over the
old file, so a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import struct
import tempfile
from pathlib import Path

from .errors import CorruptStateError

HEADER = struct.Struct(">IHI")
TRAILER_SIZE = 32


def _trailer(body: bytes, mac_key: bytes | None) -> bytes:
    if mac_key is None:
        return hashlib.sha256(body).digest()
    return hmac.new(mac_key, body, hashlib.sha256).digest()


def encode(magic: int, version: int, payload: bytes, mac_key: bytes | None = None) -> bytes:
    body = HEADER.pack(magic, version, len(payload)) + payload
    return body + _trailer(body, mac_key)


def decode(
    path: Path,
    data: bytes,
    magic: int,
    version: int,
    max_payload: int,
    mac_key: bytes | None = None,
) -> bytes:
    """Check the envelope of ``data`` (read from ``path``) and return the payload."""
    if len(data) < HEADER.size + TRAILER_SIZE:
        raise CorruptStateError(path, f"too short ({len(data)} bytes)")
    if len(data) > HEADER.size + max_payload + TRAILER_SIZE:
        raise CorruptStateError(path, f"too large ({len(data)} bytes)")
    got_magic, got_version, length = HEADER.unpack_from(data)
    if got_magic != magic:
        raise CorruptStateError(path, f"bad magic 0x{got_magic:08X} (expected 0x{magic:08X})")
    if got_version != version:
        raise CorruptStateError(path, f"unsupported format version {got_version} (expected {version})")
    if length != len(data) - HEADER.size - TRAILER_SIZE:
        raise CorruptStateError(path, "payload length does not match file size")
    body = data[: HEADER.size + length]
    expected = _trailer(body, mac_key)
    if not hmac.compare_digest(expected, data[HEADER.size + length :]):
        what = "MAC" if mac_key is not None else "checksum"
        raise CorruptStateError(path, f"{what} mismatch (file modified or damaged)")
    return data[HEADER.size : HEADER.size + length]


def read(
    path: Path, magic: int, version: int, max_payload: int, mac_key: bytes | None = None
) -> bytes:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Read at most one byte past the bound: an oversized file is never slurped.
            data = f.read(HEADER.size + max_payload + TRAILER_SIZE + 1)
    except FileNotFoundError:
        raise CorruptStateError(path, "missing") from None
    except OSError as e:
        raise CorruptStateError(path, f"unreadable: {e.strerror}") from None
    return decode(path, data, magic, version, max_payload, mac_key)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write(
    path: Path, magic: int, version: int, payload: bytes, mac_key: bytes | None = None
) -> None:
    atomic_write_bytes(path, encode(magic, version, payload, mac_key))


@contextlib.contextmanager
def locked(directory: Path):
    """Exclusive advisory lock on a state directory, for read-modify-write cycles
    (a VMM and the CLI may use the same host TPM from two processes)."""
    fd = os.open(Path(directory) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
