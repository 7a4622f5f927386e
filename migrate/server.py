"""The destination's listening socket: one migration at a time, others refused.

An acceptor thread owns ``accept()``.  When the VMM is waiting for a VM it
hands the connection over; at any other moment (a migration is already
arriving, or the received guest is running) the acceptor reads the new
peer's HELLO and answers WELCOME(BUSY) with the reason, so a second,
concurrent migration is refused clearly instead of hanging in the backlog.
"""

from __future__ import annotations

import queue
import socket
import threading

from migrate import residency
from migrate.errors import MigrationError
from migrate.messages import STATUS_BUSY, Welcome
from migrate.wire import Channel, RecordType, parse_address

REFUSE_TIMEOUT = 5.0
MAX_REFUSING = 4            # refusals answered at once; more are closed at once
MAX_REFUSED_HELLO = 4096    # what a refusal reads: one small HELLO, nothing else


class Server:
    def __init__(self, listen: str, *, timeout: float = 10.0, channel=Channel):
        host, port = parse_address(listen)
        self.timeout = timeout
        self.channel = channel          # Channel(sock, timeout=...): the secure mode brings its own
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=16)
        self.address = self.sock.getsockname()[:2]
        self.busy_reason = "this destination is busy"
        self._lock = threading.Lock()
        self._waiting = True        # a new server takes its first VM even before next_connection()
        self._handoff: queue.Queue = queue.Queue()
        self._closed = False
        self.refused = 0
        self._refusing = threading.BoundedSemaphore(MAX_REFUSING)
        self._thread = threading.Thread(target=self._accept_loop, name="migrate-acceptor", daemon=True)
        self._thread.start()
        residency.prepare()     # (its one-off libc lookup now, not after a source's HELLO)

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def next_connection(self, busy_reason: str) -> tuple[Channel, str]:
        """Wait for the next migration; while the caller handles it, others
        are refused with ``busy_reason``."""
        with self._lock:
            self.busy_reason = busy_reason
            # A connection may already be waiting in the queue (it arrived
            # before this call: a new server takes its first VM at once).  Then
            # stay closed, or the next one would be queued behind it, unanswered.
            if self._handoff.empty():
                self._waiting = True
        conn, addr = self._handoff.get()
        return self.channel(conn, timeout=self.timeout), f"{addr[0]}:{addr[1]}"

    def set_busy_reason(self, reason: str) -> None:
        with self._lock:
            self.busy_reason = reason

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._waiting:
                    self._waiting = False
                    self._handoff.put((conn, addr))
                    continue
                reason = self.busy_reason
            self.refused += 1
            if not self._refusing.acquire(blocking=False):
                conn.close()        # a flood: no thread, no buffer, just the close
                continue
            threading.Thread(target=self._refuse, args=(conn, reason), daemon=True).start()

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        ch = Channel(conn, timeout=REFUSE_TIMEOUT)
        try:
            try:            # the HELLO (only): read it so the close is not a reset
                ch.recv(only=frozenset({RecordType.HELLO}), max_body=MAX_REFUSED_HELLO)
            except MigrationError:
                pass
            ch.send(RecordType.WELCOME, Welcome(STATUS_BUSY, reason).encode())
        except MigrationError:
            pass
        finally:
            ch.close()
            self._refusing.release()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
