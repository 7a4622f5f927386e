"""A small GDB remote-protocol client for tests (no gdb needed): frames,
checksums and acks as GDB does (see minivmm/gdb_packets.py)."""

from __future__ import annotations

import socket

from minivmm.gdb_packets import checksum, frame


class Client:
    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as gdb does
        self.buf = bytearray()

    def _byte(self) -> int:
        while not self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("stub closed the connection")
            self.buf += data
        return self.buf.pop(0)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ack(self) -> bytes:
        return bytes((self._byte(),))

    def packet(self) -> str:
        """The stub's next packet (acknowledged)."""
        while self._byte() != ord("$"):
            pass
        payload = bytearray()
        while (b := self._byte()) != ord("#"):
            payload.append(b)
        sent = int(bytes((self._byte(), self._byte())), 16)
        assert sent == checksum(bytes(payload)), "bad checksum from the stub"
        self.sock.sendall(b"+")
        return payload.decode("latin-1")

    def ask(self, payload: str) -> str:
        self.sock.sendall(frame(payload.encode("latin-1")))
        assert self.ack() == b"+"
        return self.packet()

    def close(self) -> None:
        self.sock.close()
