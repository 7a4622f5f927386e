"""The migration record layer: typed, framed, sequenced, bounded records.

Everything two VMMs say to each other during a live migration is a record::

    offset  size  field
    0       2     type      RecordType (u16, little-endian); 0 is INVALID, never sent
    2       2     flags     bit 0 OPTIONAL: a receiver that does not know the type
                            skips it; without it an unknown type ends the session.
                            Other bits must be 0.
    4       4     length    body bytes; checked against the type's bound BEFORE
                            a single body byte is read (MAX_BODY; the largest,
                            PAGES, is 1 MiB + 1028 bytes)
    8       8     seq       per-direction sequence number, 0, 1, 2, ...; a record
                            out of order (dropped, replayed, reordered) ends the
                            session
    16    length  body      see ``migrate/messages.py``

The first record in each direction (HELLO from the source, WELCOME from the
destination) starts with the magic ``b"MVMIGRAT"`` and the protocol version,
so a peer speaking anything else is rejected on its first 24 bytes.

Message sequence (plain mode, protocol version 1)::

    source                                        destination
    HELLO(magic, version, ram_size, info) ───────▶
                  ◀─────── WELCOME(magic, version, status OK | BUSY | ...)
    ┌ pre-copy, guest running on the source ┐
    │ ROUND_BEGIN(r, n) ────────────────────▶    round 0 = every page,
    │ PAGES / ZERO_PAGES ...  ──────────────▶    round r>0 = pages dirtied
    │ ROUND_END(r, n) ──────────────────────▶    during round r-1
    │               ◀─────── ROUND_ACK(r, n)     stored and digested: the source
    │                                            measures end-to-end cost and
    │                                            never pauses with a backlog
    └ repeated until the pre-copy policy says stop ┘
    [source pauses the guest]
    ROUND_BEGIN/PAGES/ZERO_PAGES/ROUND_END  ──▶    the final dirty set (+ ROUND_ACK)
    STATE(chunk) ... ─────────────────────────▶    MachineState doc (all but RAM)
    DIGEST(state_len, sha256) ────────────────▶    checks: every page arrived,
                                                   digest matches, state parses
                  ◀─────── PREPARED                (or ABORT(reason))
    COMMIT ───────────────────────────────────▶    [source can never resume]
                  ◀─────── RESUMED(vclock, clock)  [destination runs the guest]

    ABORT(reason) may be sent by either side at any point before COMMIT; so
    may a closed connection or a silence past the deadline: all three mean
    "the source keeps its guest, the destination discards".

Destination state diagram::

    WAIT_HELLO ─HELLO─▶ PRECOPY ─ROUND_BEGIN─▶ IN_ROUND ─ROUND_END/ROUND_ACK─▶ PRECOPY
                          │                     (PAGES, ZERO_PAGES)
                          └─STATE─▶ STATE ─DIGEST(ok)─▶ PREPARED ─COMMIT─▶ RESUMED
    any state before RESUMED ─ABORT / error / timeout─▶ DISCARDED

Source state diagram::

    CONNECT ─WELCOME─▶ PRECOPY (rounds) ─policy stop─▶ PAUSED ─PREPARED─▶ COMMITTED ─RESUMED─▶ DONE
    any state before COMMITTED ─error─▶ ABORTED (dirty log stopped, guest continues)
    COMMITTED ─error─▶ COMMIT_UNCONFIRMED (never resumes locally)

Why this shape (DESIGN §6): the secure protocol of a later issue replaces
:class:`Channel` with one that wraps every record (header included, as
associated data) in an AEAD with a counter nonce; ``seq`` is already the
counter it needs.  Attestation fits between HELLO and WELCOME, and the
PREPARED/COMMIT exchange is the commit point after which the source never
resumes (Intel TDX migration's model).
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

from migrate.errors import ConnectionLost, PeerTimeout, ProtocolError
from migrate.steps import HEAD_BYTES, RECV, SEND, Step

MAGIC = b"MVMIGRAT"
VERSION = 3                          # 2: the completeness digest v2 (migrate/digest.py);
                                     # 3: a sealed PAGES record's AEAD tag stands for its GMAC there
HEADER = struct.Struct("<HHIQ")
FLAG_OPTIONAL = 0x0001
KNOWN_FLAGS = FLAG_OPTIONAL

PAGE_SIZE = 4096
MAX_BATCH = 256                      # pages per PAGES record (1 MiB of data)
MAX_ZERO_BATCH = 16384               # frame numbers per ZERO_PAGES record
MAX_CHUNK = 1 << 20                  # STATE chunk
MAX_SMALL = 4096                     # control records
MAX_EVIDENCE = 256 << 10             # a TPM evidence bundle (quote, AK certificate, event log)
MAX_KEY_RELEASE = 8 << 20            # sealed process keys and protection metadata


class RecordType(IntEnum):
    INVALID = 0
    HELLO = 1
    WELCOME = 2
    ROUND_BEGIN = 3
    PAGES = 4
    ZERO_PAGES = 5
    ROUND_END = 6
    STATE = 7
    DIGEST = 8
    PREPARED = 9
    COMMIT = 10
    RESUMED = 11
    ABORT = 12
    ROUND_ACK = 13
    # The secure protocol (migrate/secure/, docs/protocol.md)
    KEY_SHARE = 14
    QUOTE = 15
    FRESH_NONCE = 16
    FINAL_QUOTE = 17
    KEY_RELEASE = 18


# The bound on each type's body, checked before the body is read.
MAX_BODY = {
    RecordType.HELLO: MAX_SMALL,
    RecordType.WELCOME: MAX_SMALL,
    RecordType.ROUND_BEGIN: 8,
    RecordType.PAGES: 4 + MAX_BATCH * (4 + PAGE_SIZE),
    RecordType.ZERO_PAGES: 4 + MAX_ZERO_BATCH * 4,
    RecordType.ROUND_END: 8,
    RecordType.STATE: MAX_CHUNK,
    RecordType.DIGEST: 40,
    RecordType.PREPARED: 0,
    RecordType.COMMIT: 32,           # empty in plain mode; the commit token in secure mode
    RecordType.RESUMED: MAX_SMALL,
    RecordType.ABORT: MAX_SMALL,
    RecordType.ROUND_ACK: 8,
    RecordType.KEY_SHARE: 64,
    RecordType.QUOTE: MAX_EVIDENCE,
    RecordType.FRESH_NONCE: 32,
    RecordType.FINAL_QUOTE: 32 + MAX_EVIDENCE,
    RecordType.KEY_RELEASE: MAX_KEY_RELEASE,
}
MAX_BODY_ANY = max(MAX_BODY.values())
MAX_SKIPPED = 64                     # unknown optional records tolerated per session
IOV_MAX = 1024                       # buffers per recvmsg_into call (Linux's UIO_MAXIOV)


@dataclass(frozen=True)
class Record:
    type: RecordType
    body: bytes | bytearray
    seq: int
    flags: int = 0
    # A PAGES record received with a ``sink`` (Channel.recv): ``body`` is only
    # its head (count, frame numbers) and the pages are already in these
    # buffers (the runs of guest RAM the sink named), in frame order.
    placed: tuple = ()
    # The AES-GCM tag that authenticated it (sealed channel), else empty.
    tag: bytes = b""


def pages_head_size(length: int) -> int:
    """The size of a PAGES body's head (count u32, frame numbers u32 each)
    for a body of ``length`` bytes, or 0 if no whole number of pages fits."""
    n = length - 4
    if n <= 0 or n % (4 + PAGE_SIZE):
        return 0
    return 4 + 4 * (n // (4 + PAGE_SIZE))


class Channel:
    """One direction-pair of records over a stream socket.

    ``timeout`` bounds the time to receive, or to send, one whole record
    (header and body), not each ``recv``/``sendmsg`` call, so a peer that
    trickles one byte at a time, or drains our bytes one at a time, is cut
    off as surely as one that says nothing.  ``deadline`` (an absolute
    ``self.now()``, or None) bounds a whole phase on top: the source
    sets it at pause, so a slow peer cannot keep the guest paused.  The engine uses only
    :meth:`send`, :meth:`recv`, :meth:`close`, ``timeout`` and the byte
    counters, so the secure channel of a later issue (AEAD per record, the
    header as associated data, ``seq`` as the counter nonce) can stand in for
    this class without a change to ``source``/``destination``.

    ``on_step`` and ``now`` are the protocol-step seam (migrate/steps.py): a
    hook called at every record sent or received, and the clock all timeouts
    are measured on.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0):
        self.sock = sock
        self.timeout = timeout
        self.send_seq = 0
        self.recv_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.skipped = 0
        self.deadline: float | None = None
        self.broken: str | None = None      # why a send failed (then nothing more is sent)
        self.sent_tag = b""                 # the last record's AEAD tag (sealed channel), else empty
        # The protocol-step seam (migrate/steps.py): a hook at every record, and the
        # clock every timeout and deadline is measured on (a TUI holding the engine
        # stops it, so nothing times out while a student reads).
        self.on_step = None
        self.now = time.monotonic
        self.steps = 0
        try:        # small control records must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass    # not TCP (a socketpair in tests)

    # ------------------------------------------------------------------ send
    def send(self, rtype: RecordType, *parts) -> None:
        """Send one record whose body is the concatenation of ``parts``
        (bytes-like; sent scatter-gather, never joined into one copy)."""
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(len(v) for v in views)
        rtype = self._check_body(rtype, length)
        self._write_record(rtype, HEADER.pack(rtype, 0, length, self.send_seq), views, self._head(views))

    #: Whether this channel can seal a PAGES record straight from guest RAM
    #: (``send_pages_from``): only a channel whose records carry an AEAD tag
    #: over what was sent (migrate/secure/channel.py).
    seals_pages = False

    @staticmethod
    def _check_body(rtype, length: int) -> RecordType:
        """The record type, if it is a real one and ``length`` is within its bound."""
        rtype = RecordType(rtype)
        if rtype is RecordType.INVALID:
            raise ValueError("record type 0 is invalid")
        if length > MAX_BODY[rtype]:
            raise ValueError(f"{rtype.name} body of {length} bytes exceeds its bound {MAX_BODY[rtype]}")
        return rtype

    @property
    def overhead(self) -> int:
        """Bytes a record's wire body has beyond its plaintext (a step's length
        counts them): none here; the sealed channel's AEAD tag."""
        return 0

    def _head(self, views) -> bytes:
        """The first HEAD_BYTES of a body, for a step hook (none without one)."""
        if self.on_step is None:
            return b""
        out, left = [], HEAD_BYTES
        for v in views:
            if left <= 0:
                break
            out.append(bytes(v[:left]))
            left -= len(out[-1])
        return b"".join(out)

    def _write_record(self, rtype: RecordType, header: bytes, views: list, head: bytes = b"") -> None:
        """Put one record (``header`` then ``views``) on the wire within the
        timeout, or raise the migration error that says why not.  ``head``:
        the start of the body as the sender wrote it (before sealing), for the step hook."""
        length = sum(len(v) for v in views)
        self._stepped(SEND, rtype, length, self.send_seq, head)
        try:
            self._sendall([memoryview(header), *views], self._deadline(self.timeout))
        except (socket.timeout, TimeoutError):
            raise PeerTimeout(f"peer did not take a {rtype.name} record of {length} bytes within "
                              f"{self.timeout:g} s (or the phase deadline)") from None
        except OSError as exc:
            raise ConnectionLost(f"connection lost while sending {rtype.name}: {exc.strerror or exc}") from None
        self.send_seq += 1
        self.bytes_sent += HEADER.size + length

    def _stepped(self, direction: str, rtype: RecordType, length: int, seq: int, head: bytes = b"") -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(Step(self.steps, direction, rtype.name, length, seq, head))

    def _deadline(self, timeout: float) -> float:
        deadline = self.now() + timeout
        return deadline if self.deadline is None else min(deadline, self.deadline)

    def _sendall(self, views: list, deadline: float) -> None:
        """Write one whole record, or mark the stream broken.  A send that
        failed (timeout, reset) may have put part of its record on the wire:
        the framing is lost for the peer, and a sealed record's nonce is
        spent.  So nothing more is ever sent on this stream -- not even a
        best-effort ABORT, which under the secure channel would reuse the
        failed record's sequence number as its AES-GCM nonce and give a man
        in the middle the XOR of the two plaintexts."""
        if self.broken:
            raise BrokenPipeError(errno.EPIPE, f"nothing more is sent after a failed send ({self.broken})")
        views = [v for v in views if len(v)]
        try:
            while views:
                left = deadline - self.now()
                if left <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left)
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except BaseException as exc:
            self.broken = type(exc).__name__
            raise

    # ------------------------------------------------------------------ recv
    def pending_abort(self) -> bool:
        """Whether an ABORT is already waiting to be read (non-blocking peek):
        the source's last check before COMMIT."""
        try:
            self.sock.settimeout(0)
            head = self.sock.recv(HEADER.size, socket.MSG_PEEK)
        except (BlockingIOError, socket.timeout, TimeoutError, InterruptedError):
            return False
        except OSError:
            return False        # a dead connection shows when COMMIT is sent
        if len(head) < HEADER.size:
            return False
        return HEADER.unpack(head)[0] == RecordType.ABORT

    def recv(self, *, timeout: float | None = None, only: frozenset | None = None,
             max_body: int | None = None, sink=None) -> Record:
        """Receive one record.  ``only``/``max_body`` narrow what is accepted
        before any body byte is read (a refusal path reads only a small HELLO).

        ``sink`` (the destination's guest RAM, ``migrate/landing.py``): a
        PAGES record's head (count, frame numbers) is read first and handed to
        ``sink(head, length)``, which checks it and returns the writable
        buffers its pages belong in; the pages are then read (sealed:
        decrypted) straight into them -- no buffer per record, no copy.  The
        record comes back with ``placed`` set.  A PAGES body whose length
        fits no whole number of pages is read the ordinary way."""
        before = self.bytes_received
        record = self._recv(timeout=timeout, only=only, max_body=max_body, sink=sink)
        head = b""
        if self.on_step is not None:
            head = bytes(record.body[:HEAD_BYTES])
            if record.placed:
                head = (head + bytes(record.placed[0][:HEAD_BYTES]))[:HEAD_BYTES]
        self._stepped(RECV, record.type, self.bytes_received - before - HEADER.size, record.seq, head)
        return record

    def _recv(self, *, timeout: float | None = None, only: frozenset | None = None,
              max_body: int | None = None, sink=None) -> Record:
        """One record off the wire, checked; subclasses (the sealed channel) override this."""
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        while True:
            header = self._read_exact(HEADER.size, deadline, "a record header")
            tcode, flags, length, seq = HEADER.unpack(header)
            if tcode == RecordType.INVALID:
                raise ProtocolError("record type 0 (INVALID)")
            if flags & ~KNOWN_FLAGS:
                raise ProtocolError(f"record with unknown flags {flags:#x}")
            if seq != self.recv_seq:
                raise ProtocolError(f"record out of order: sequence number {seq}, expected {self.recv_seq}")
            try:
                rtype = RecordType(tcode)
            except ValueError:
                if not flags & FLAG_OPTIONAL:
                    raise ProtocolError(f"unknown mandatory record type {tcode}") from None
                if length > MAX_BODY_ANY or self.skipped >= MAX_SKIPPED:
                    raise ProtocolError(f"unknown optional record type {tcode} of {length} bytes refused")
                self._read_exact(length, deadline, f"record type {tcode}")
                self.recv_seq += 1
                self.skipped += 1
                continue
            if only is not None and rtype not in only:
                raise ProtocolError(f"unexpected {rtype.name} record")
            bound = MAX_BODY[rtype] if max_body is None else min(max_body, MAX_BODY[rtype])
            if length > bound:
                raise ProtocolError(f"{rtype.name} record of {length} bytes exceeds its bound {bound}")
            if sink is not None and rtype is RecordType.PAGES and pages_head_size(length):
                head = self._read_exact(pages_head_size(length), deadline, "a PAGES head")
                views = sink(head, length)
                self._read_into(views, deadline, "a PAGES body")
                self.recv_seq += 1
                return Record(rtype, head, seq, flags, tuple(views))
            body = self._read_exact(length, deadline, f"a {rtype.name} body") if length else b""
            self.recv_seq += 1
            return Record(rtype, body, seq, flags)

    def _read_exact(self, n: int, deadline: float, what: str) -> bytearray:
        buf = bytearray(n)
        self._read_into([buf], deadline, what)
        return buf

    def _read_into(self, views: list, deadline: float, what: str) -> None:
        """Fill the writable buffers ``views``, in order, from the stream
        (``recvmsg_into``: one call fills several runs of RAM)."""
        views = [memoryview(v).cast("B") for v in views if len(v)]
        n = sum(len(v) for v in views)
        got = 0
        while views:
            left = deadline - self.now()
            if left <= 0:
                raise PeerTimeout(f"timed out waiting for {what} ({got} of {n} bytes after "
                                  f"{self.timeout:g} s, or the phase deadline)")
            try:
                self.sock.settimeout(left)
                k = self.sock.recvmsg_into(views[:IOV_MAX])[0]
            except (socket.timeout, TimeoutError):
                continue
            except OSError as exc:
                raise ConnectionLost(f"connection lost while reading {what}: {exc.strerror or exc}") from None
            if k == 0:
                raise ConnectionLost(f"peer closed the connection while we waited for {what} "
                                     f"(after {self.recv_seq} records)")
            got += k
            while views and k >= len(views[0]):
                k -= len(views[0])
                views.pop(0)
            if k:
                views[0] = views[0][k:]
        self.bytes_received += n

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to a socket address."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be HOST:PORT, not {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, number
