"""A recording man in the middle for migration tests and labs.

``Proxy(dest_port)`` listens on a free loopback port, accepts one source,
connects to the destination and forwards the source's records one by one
(parsing only the fixed header of ``migrate.wire``), keeping every byte it
forwarded in ``.recorded``.  With ``cut_at=RecordType.X`` it cuts both
connections when a record of that type arrives from the source (calling
``on_cut`` first): what a network failure at that moment does.  The
destination's replies are passed back unchanged.
"""

from __future__ import annotations

import socket
import threading

from migrate.wire import HEADER, RecordType


class Proxy:
    """Forward one connection source -> destination record by record; when a
    record of type ``cut_at`` comes from the source, call ``on_cut`` (if any)
    and then cut both connections without forwarding it."""

    def __init__(self, dest_port: int, *, cut_at: RecordType | None = None, on_cut=None):
        self.dest_port = dest_port
        self.cut_at = cut_at
        self.on_cut = on_cut
        self.cut = threading.Event()
        self.seen: list[RecordType] = []
        self.recorded = bytearray()            # every byte forwarded source -> destination
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        src, _ = self.listener.accept()
        dst = socket.create_connection(("127.0.0.1", self.dest_port))
        back = threading.Thread(target=self._pump_back, args=(dst, src), daemon=True)
        back.start()
        try:
            while True:
                header = read_exact(src, HEADER.size)
                if header is None:
                    break
                rtype, _, length, _ = HEADER.unpack(header)
                body = read_exact(src, length) if length else b""
                self.seen.append(RecordType(rtype))
                if self.cut_at is not None and rtype == self.cut_at:
                    if self.on_cut:
                        self.on_cut()
                    self.cut.set()
                    break
                self.recorded += header + (body or b"")
                dst.sendall(header + (body or b""))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:        # shutdown first: close() alone does not wake a recv in another thread
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.listener.close()

    @staticmethod
    def _pump_back(dst, src):
        try:
            while True:
                data = dst.recv(65536)
                if not data:
                    return
                src.sendall(data)
        except OSError:
            return


def read_exact(sock, n):
    """``n`` bytes from ``sock``, or None if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
