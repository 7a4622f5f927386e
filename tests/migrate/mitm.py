"""A man in the middle on loopback for the secure-protocol tests: forwards one
connection record by record, records every byte in both directions, and lets a
test replace any source -> destination record by what it likes (nothing, the
record twice, a modified copy, an earlier record)."""

from __future__ import annotations

import socket
import threading

from migrate.proxy import read_exact as _read
from migrate.wire import HEADER, RecordType


class Mitm:
    """``meddle(seen, rtype, raw) -> list[bytes]``: what to forward in place of
    the source's record ``raw`` (``seen``: the source's records so far)."""

    def __init__(self, dest_port: int, meddle=None, meddle_back=None):
        self.dest_port = dest_port
        self.meddle = meddle
        self.meddle_back = meddle_back          # the same, destination -> source
        self.seen_back: list[tuple[RecordType, bytes]] = []
        self.seen: list[tuple[RecordType, bytes]] = []
        self.to_dest = bytearray()
        self.to_source = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def wire(self) -> bytes:
        return bytes(self.to_dest + self.to_source)

    def _run(self):
        src, _ = self.listener.accept()
        dst = socket.create_connection(("127.0.0.1", self.dest_port))
        self._socks = (src, dst)
        threading.Thread(target=self._back, args=(dst, src), daemon=True).start()
        try:
            _pump(src, dst, self.meddle, self.seen, self.to_dest)
        except OSError:
            pass
        finally:
            self._cut()
            self.listener.close()

    def _cut(self):
        """Close both connections (a meddler raising OSError cuts here)."""
        for s in self._socks:
            try:        # shutdown first: close() alone does not wake a recv in another thread
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _back(self, dst, src):
        try:
            _pump(dst, src, self.meddle_back, self.seen_back, self.to_source)
        except OSError:
            self._cut()


def _pump(frm, to, meddle, seen, sink: bytearray) -> None:
    """Forward records ``frm`` -> ``to`` until ``frm`` closes: each record is
    replaced by what ``meddle(seen, rtype, raw)`` returns (if any), noted in
    ``seen`` and, as forwarded, in ``sink``.  A meddler raising OSError cuts."""
    while True:
        header = _read(frm, HEADER.size)
        if header is None:
            return
        rtype, _, length, _ = HEADER.unpack(header)
        raw = header + (_read(frm, length) or b"" if length else b"")
        out = [raw] if meddle is None else meddle(seen, RecordType(rtype), raw)
        seen.append((RecordType(rtype), raw))
        for r in out:
            sink += r
            to.sendall(r)
