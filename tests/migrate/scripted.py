"""A scripted destination: a small peer on the record layer that answers a
real source the way an honest destination would (WELCOME, a ROUND_ACK for
every ROUND_END, PREPARED after DIGEST, RESUMED after COMMIT), while a test
corrupts its reply stream at a chosen byte (flip or cut) or adds records.

It reacts to what the source sends, so it reaches PREPARED and COMMIT for
whatever number of rounds the source runs; ``received`` lists the record
types it got (a test asks whether COMMIT arrived)."""

import socket
import threading
import time

from migrate import clock
from migrate.errors import MigrationError
from migrate.messages import Resumed, Welcome, STATUS_OK
from migrate.wire import HEADER, Channel, RecordType


class ScriptedDestination:
    def __init__(self, *, flip_at=None, xor=0, cut_at=None, after_prepared=(), timeout=10.0,
                 boot_id=None):
        self.boot_id = boot_id or clock.boot_id()      # RESUMED's: another host if it differs
        self.flip_at, self.xor, self.cut_at = flip_at, xor, cut_at
        self.after_prepared = list(after_prepared)     # (type, body) sent with PREPARED, in one write
        self.timeout = timeout
        self.received: list[RecordType] = []
        self.sent = 0               # reply bytes produced (before any cut)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _raw(self, ch, rtype, body=b""):
        raw = HEADER.pack(rtype, 0, len(body), ch.send_seq) + body
        ch.send_seq += 1
        return raw

    def _reply(self, conn, raw: bytes) -> bool:
        """Send ``raw`` through the corruption; False once the stream is cut."""
        start, self.sent = self.sent, self.sent + len(raw)
        data = bytearray(raw)
        if self.flip_at is not None and start <= self.flip_at < self.sent:
            data[self.flip_at - start] ^= self.xor
        if self.cut_at is not None and self.cut_at < self.sent:
            conn.sendall(data[:max(0, self.cut_at - start)])
            return False
        conn.sendall(data)
        return True

    def _serve(self):
        conn, _ = self.listener.accept()
        ch = Channel(conn, timeout=self.timeout)
        try:
            while True:
                rec = ch.recv()
                self.received.append(rec.type)
                if rec.type is RecordType.HELLO:
                    raw = self._raw(ch, RecordType.WELCOME, Welcome(STATUS_OK).encode())
                elif rec.type is RecordType.ROUND_END:
                    raw = self._raw(ch, RecordType.ROUND_ACK, bytes(rec.body))
                elif rec.type is RecordType.DIGEST:
                    raw = self._raw(ch, RecordType.PREPARED)
                    raw += b"".join(self._raw(ch, t, b) for t, b in self.after_prepared)
                elif rec.type is RecordType.COMMIT:
                    raw = self._raw(ch, RecordType.RESUMED,
                                    Resumed(0, time.monotonic(), self.boot_id).encode())
                else:
                    continue
                if not self._reply(conn, raw):
                    break
        except (MigrationError, OSError):
            pass
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self):
        self.thread.join(30)
        self.listener.close()
