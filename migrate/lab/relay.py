"""The record-aware man in the middle: one TCP connection source -> relay ->
destination, forwarded record by record in both directions.

Each record from either side goes through an optional meddler
``meddle(seen, rtype, raw) -> list[bytes]`` (what to send in its place:
nothing, the record twice, a modified copy, an earlier record); ``seen`` is
that direction's records so far as ``(RecordType, raw)``.  Every record is
noted in ``seen``/``seen_back``, the bytes forwarded in ``to_dest`` /
``to_source``, optionally logged one line each (``records.describe``) and
written to a capture file (``capture.py``) with what the relay did to it.

A meddler may also send on the other direction (``send_to_dest`` /
``send_to_source``): a forged COMMIT answers the destination's PREPARED.
A meddler raising OSError cuts both connections.  A record the meddler
holds back and sends later unchanged counts as forwarded; one never sent is
noted as dropped when the connection ends.

``tests/migrate/mitm.py`` (``Mitm``) is this class on a loopback port.
"""

from __future__ import annotations

import socket
import threading

from migrate.lab import capture as cap
from migrate.lab.records import describe, read_record
from migrate.wire import RecordType


class Relay:
    def __init__(self, dest: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0),
                 meddle=None, meddle_back=None, capture: cap.CaptureWriter | None = None, log=None,
                 start: bool = True):
        self.dest = dest
        self.meddle = meddle
        self.meddle_back = meddle_back
        self.capture = capture
        self.log = log                          # log(str) per record, or None
        self.seen: list[tuple[RecordType, bytes]] = []
        self.seen_back: list[tuple[RecordType, bytes]] = []
        self.to_dest = bytearray()
        self.to_source = bytearray()
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._socks: tuple = ()
        self._locks = {cap.TO_DEST: threading.Lock(), cap.TO_SOURCE: threading.Lock()}
        self._held: dict[int, list[bytes]] = {cap.TO_DEST: [], cap.TO_SOURCE: []}
        self.listener = socket.create_server(listen)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        if start:
            self.thread.start()

    @property
    def wire(self) -> bytes:
        return bytes(self.to_dest + self.to_source)

    def _run(self):
        try:
            src, _ = self.listener.accept()
        except OSError:
            self.done.set()
            return
        self.listener.close()
        try:
            dst = socket.create_connection(self.dest)
        except OSError as exc:
            self.error = exc
            src.close()
            self.done.set()
            return
        self.serve(src, dst)

    def serve(self, src, dst) -> None:
        """Relay between two connected sockets until either side closes."""
        self._socks = (src, dst)
        back = threading.Thread(target=self._back, args=(dst, src), daemon=True)
        back.start()
        try:
            self._pump(src, cap.TO_DEST)
        except (OSError, ValueError) as exc:
            self.error = self.error or exc
        finally:
            self._cut()
            back.join(30)
            for direction, held in self._held.items():
                for raw in held:             # never sent: dropped
                    self._note(direction, cap.DROPPED, raw)
            self.done.set()

    def _back(self, dst, src):
        try:
            self._pump(dst, cap.TO_SOURCE)
        except (OSError, ValueError) as exc:
            self.error = self.error or exc
            self._cut()

    def _cut(self):
        """Close both connections (shutdown first: close() alone does not wake
        a recv in another thread)."""
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._cut()
        try:
            self.listener.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ pump
    def _pump(self, frm, direction: int) -> None:
        meddle = self.meddle if direction == cap.TO_DEST else self.meddle_back
        seen = self.seen if direction == cap.TO_DEST else self.seen_back
        while True:
            raw = read_record(frm)
            if raw is None:
                return
            rtype = RecordType(raw[0] | raw[1] << 8) if (raw[0] | raw[1] << 8) in RecordType._value2member_map_ \
                else RecordType.INVALID
            out = [raw] if meddle is None else meddle(seen, rtype, raw)
            seen.append((rtype, raw))
            held = self._held[direction]
            if raw not in out:
                held.append(raw)            # held back: dropped, unless sent later unchanged
            for r in out:
                if r == raw:
                    action = cap.FORWARDED
                elif r in held:
                    held.remove(r)
                    action = cap.FORWARDED  # a held record, released unchanged
                else:
                    action = cap.INJECTED
                self._send(direction, r, action)

    def _send(self, direction: int, raw: bytes, action: int = cap.INJECTED) -> None:
        sock = self._socks[1] if direction == cap.TO_DEST else self._socks[0]
        sink = self.to_dest if direction == cap.TO_DEST else self.to_source
        with self._locks[direction]:
            self._note(direction, action, raw)
            sink += raw
            sock.sendall(raw)

    def send_to_dest(self, raw: bytes) -> None:
        self._send(cap.TO_DEST, raw)

    def send_to_source(self, raw: bytes) -> None:
        self._send(cap.TO_SOURCE, raw)

    def _note(self, direction: int, action: int, raw: bytes) -> None:
        if self.capture is not None:
            self.capture.write(direction, action, raw)
        if self.log is not None:
            self.log(f"{cap.DIRECTIONS[direction]} {describe(raw)}"
                     + ("" if action == cap.FORWARDED else f"  [{cap.ACTIONS[action].upper()}]"))
