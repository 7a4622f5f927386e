"""GDB remote serial protocol: packet framing over one TCP connection.

The wire format (GDB manual, "Remote Protocol", "Overview"): a packet is
``$payload#cc`` where ``cc`` is the modulo-256 sum of the payload bytes in two
hex digits.  The receiver answers ``+`` (good) or ``-`` (resend).  Outside a
packet, the byte 0x03 is an interrupt request (the user pressed Ctrl-C in
GDB).  Binary data (``qXfer`` replies) escapes ``#$}*`` as ``}`` followed by
the byte XOR 0x20.  We never use run-length encoding and never ask for
no-ack mode; every packet is bounded by ``MAX_PACKET`` before it is parsed.
"""

from __future__ import annotations

import select
import socket

MAX_PACKET = 16384          # we advertise PacketSize=4000 (hex): GDB never sends more
INTERRUPT = 0x03
MAX_RESENDS = 8


class ProtocolError(Exception):
    """The peer broke the framing (oversized packet, endless resend requests)."""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


class Connection:
    """One GDB connection.  ``read_packet`` blocks; ``poll_interrupt`` never does."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.interrupted = False        # a 0x03 arrived

    def _recv(self) -> None:
        data = self.sock.recv(4096)
        if not data:
            raise EOFError("gdb closed the connection")
        self.buf += data

    def _take_out_of_band(self) -> None:
        """Drop acks and note interrupts that precede the next packet."""
        while self.buf and self.buf[0] != ord("$"):
            if self.buf[0] == INTERRUPT:
                self.interrupted = True
            del self.buf[0]

    def read_packet(self) -> bytes:
        """The next packet's payload (acknowledged).  An interrupt byte that
        arrives instead is noted in ``interrupted`` and returned as ``b"\\x03"``."""
        while True:
            self._take_out_of_band()
            if self.interrupted:
                self.interrupted = False
                return bytes((INTERRUPT,))
            end = self.buf.find(b"#")
            if self.buf and end >= 0 and len(self.buf) >= end + 3:
                payload = bytes(self.buf[1:end])
                try:
                    sent = int(self.buf[end + 1:end + 3], 16)
                except ValueError:
                    sent = -1
                del self.buf[:end + 3]
                if sent != checksum(payload):
                    self.sock.sendall(b"-")
                    continue
                self.sock.sendall(b"+")
                return payload
            if len(self.buf) > MAX_PACKET:
                raise ProtocolError(f"packet longer than {MAX_PACKET} bytes")
            self._recv()

    def send_packet(self, payload: bytes) -> None:
        """Send and wait for GDB's ``+`` (resend on ``-``)."""
        data = frame(payload)
        for _ in range(MAX_RESENDS):
            self.sock.sendall(data)
            while True:
                while self.buf and self.buf[0] not in b"+-":
                    if self.buf[0] == INTERRUPT:
                        self.interrupted = True
                        del self.buf[0]
                        continue
                    if self.buf[0] == ord("$"):
                        # GDB went on without acking (it only does that in no-ack mode)
                        return
                    del self.buf[0]
                if self.buf:
                    ack = self.buf.pop(0)
                    if ack == ord("+"):
                        return
                    break                   # "-": send again
                self._recv()
        raise ProtocolError(f"gdb asked {MAX_RESENDS} times for the same packet again")

    def poll_interrupt(self) -> bool:
        """While the guest runs: has GDB sent Ctrl-C (0x03)?  Never blocks."""
        while select.select([self.sock], [], [], 0)[0]:
            self._recv()
            if INTERRUPT in self.buf:
                self.buf = self.buf.replace(bytes((INTERRUPT,)), b"")
                self.interrupted = True
            if len(self.buf) > MAX_PACKET:
                raise ProtocolError(f"packet longer than {MAX_PACKET} bytes")
        if self.interrupted:
            self.interrupted = False
            return True
        return False
