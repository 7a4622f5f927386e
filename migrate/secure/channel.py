"""The sealed record channel: every record after the handshake under AES-256-GCM.

Same framing as ``migrate/wire.py`` (type u16, flags u16, length u32, seq u64,
body); once :meth:`SealedChannel.seal` is called with the session keys, each
record's body is ``AESGCM(key[direction]).encrypt(nonce, body, aad=header)``:

* key: ``s2d`` for records from the source, ``d2s`` for the destination's;
* nonce (12 bytes): direction u32 big-endian (1 source->destination,
  2 destination->source) || sequence number u64 big-endian.  The sequence
  number counts every record of the direction from the first (HELLO or
  WELCOME), never repeats, and the receiver builds the nonce from the number
  it *expects*, not from the header: a replayed, reordered, duplicated or
  dropped record fails authentication even if an attacker rewrites its header;
* associated data: the 16-byte header (its length field counts the 16-byte
  tag), so the type, flags and length are authenticated too: an attacker
  cannot turn PAGES into ABORT or cut a record short.

Any failure raises :class:`RecordRejected` naming what happened; nothing from
a rejected record is used.  Bounds are checked on the header before a body
byte is read (the type's bound plus the tag).

ABORT, COMMIT and RESUMED travel sealed like every other record, so neither
can be forged by anyone without the session keys.  ``pending_abort`` (the
source's last check before COMMIT) reads and authenticates a waiting record
instead of peeking at a raw header.

Teaching switches (``--insecure``): ``encryption`` sends records in clear
(wire.Channel's behaviour); ``replay`` takes the sequence number from the
header and does not require it to be the next one.
"""

from __future__ import annotations

import socket
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migrate.errors import ProtocolError
from migrate.secure.errors import RecordRejected
from migrate.wire import (FLAG_OPTIONAL, HEADER, KNOWN_FLAGS, MAX_BODY, Channel, Record, RecordType,
                          pages_head_size)

TAG = 16
SOURCE_TO_DEST, DEST_TO_SOURCE = 1, 2
_NONCE = struct.Struct(">IQ")


def record_nonce(direction: int, seq: int) -> bytes:
    return _NONCE.pack(direction, seq)


class SealedChannel(Channel):
    """A :class:`wire.Channel` that seals records once keys are installed.

    ``role``: "source" or "destination" (which key and direction we send with).
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0, role: str = "source",
                 encryption: bool = True, replay: bool = True):
        super().__init__(sock, timeout=timeout)
        if role not in ("source", "destination"):
            raise ValueError(f"role {role!r}")
        self.role = role
        self.encryption = encryption
        self.check_sequence = replay
        self._send_aead = self._recv_aead = None
        self.sealed = False
        self._out = bytearray()         # reused: the sealed body of the record being sent
        self._staging = bytearray()     # reused: a PAGES record whose head the sink refused

    def seal(self, keys) -> None:
        """Install the session keys: from the next record on, both directions sealed."""
        send_key, recv_key = (keys.s2d, keys.d2s) if self.role == "source" else (keys.d2s, keys.s2d)
        self._send_dir = SOURCE_TO_DEST if self.role == "source" else DEST_TO_SOURCE
        self._recv_dir = DEST_TO_SOURCE if self.role == "source" else SOURCE_TO_DEST
        if self.encryption:
            self._send_aead, self._recv_aead = AESGCM(send_key), AESGCM(recv_key)
            self._send_key, self._recv_key = send_key, recv_key
        self.sealed = True

    @property
    def _aead_on(self) -> bool:
        return self.sealed and self._send_aead is not None

    @property
    def overhead(self) -> int:
        return TAG if self._aead_on else 0

    # ------------------------------------------------------------------ send
    def send(self, rtype: RecordType, *parts) -> None:
        self.sent_tag = b""
        if not self._aead_on:
            return super().send(rtype, *parts)
        views = [memoryview(p).cast("B") for p in parts]
        body = views[0] if len(views) == 1 else b"".join(views)      # one part: no joining copy
        rtype = self._check_body(rtype, len(body))
        header = HEADER.pack(rtype, 0, len(body) + TAG, self.send_seq)
        sealed = self._sealed_out(len(body) + TAG)
        self._send_aead.encrypt_into(record_nonce(self._send_dir, self.send_seq), body, header, sealed)
        self._write_record(rtype, header, [sealed], self._head([memoryview(body)]))
        self.sent_tag = bytes(sealed[-TAG:])        # the page digest folds it (migrate/digest.py)

    def _sealed_out(self, size: int) -> memoryview:
        """``size`` bytes of the one reused buffer a record is sealed into (a
        fresh 1 MiB one per record costs its page faults); each send is done
        with it before it returns."""
        if len(self._out) < size:
            self._out = bytearray(size)
        return memoryview(self._out)[:size]

    @property
    def seals_pages(self) -> bool:
        return self._aead_on

    def send_pages_from(self, head, pieces, *, keep=None) -> bool:
        """Send a PAGES record whose body is ``head`` (count, frame numbers)
        then ``pieces`` (the pages, in order) -- read straight from guest RAM,
        without a private copy.

        AES-GCM is a stream cipher: the pages are encrypted as they are read,
        into the reused record buffer, and the tag is taken over that
        ciphertext, so what is sent is what is authenticated even if the guest
        writes a page meanwhile (the page is dirty then and goes again; the
        destination's digest counts only its last copy).  A plain record has no
        such tag: its GMAC over RAM and the bytes sent from RAM could differ,
        which is why plain mode copies first.

        ``keep()``, if given, runs after the pages were read and before a byte
        is sent; if it says no (a frame was protected meanwhile), nothing is
        sent, the sequence number is not used, and the ciphertext is
        overwritten by the next record (it never leaves this process, so its
        nonce is not reused on the wire): the caller sends the record from a
        copy instead.  Returns whether the record was sent."""
        views = [memoryview(head).cast("B"), *(memoryview(p).cast("B") for p in pieces)]
        n = sum(len(v) for v in views)
        self._check_body(RecordType.PAGES, n)
        header = HEADER.pack(RecordType.PAGES, 0, n + TAG, self.send_seq)
        sealed = self._sealed_out(n + TAG)
        enc = Cipher(algorithms.AES(self._send_key), modes.GCM(record_nonce(self._send_dir, self.send_seq))).encryptor()
        enc.authenticate_additional_data(header)
        off = 0
        for v in views:
            enc.update_into(v, sealed[off:off + len(v)])
            off += len(v)
        enc.finalize()
        if keep is not None and not keep():
            return False
        sealed[n:] = enc.tag
        self.sent_tag = b""
        self._write_record(RecordType.PAGES, header, [sealed], self._head(views[:1]))
        self.sent_tag = enc.tag
        return True

    # ------------------------------------------------------------------ recv
    def _recv(self, *, timeout: float | None = None, only: frozenset | None = None,
              max_body: int | None = None, sink=None) -> Record:
        if not self.sealed:
            return super()._recv(timeout=timeout, only=only, max_body=max_body, sink=sink)
        if not self._aead_on:
            if self.check_sequence:
                return super()._recv(timeout=timeout, only=only, max_body=max_body, sink=sink)
            return self._recv_clear_any_seq(timeout, only, max_body)
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        header = bytes(self._read_exact(HEADER.size, deadline, "a record header"))
        tcode, flags, length, seq = HEADER.unpack(header)
        try:
            rtype = RecordType(tcode)
        except ValueError:
            # No unknown record is skipped once sealed: it could not be authenticated
            # without reading it, and there is no optional secure record.
            raise RecordRejected(f"unknown record type {tcode} in the sealed channel") from None
        if rtype is RecordType.INVALID or flags & ~KNOWN_FLAGS or flags & FLAG_OPTIONAL:
            raise RecordRejected(f"sealed record with bad type/flags {tcode}/{flags:#x}")
        if self.check_sequence and seq != self.recv_seq:
            raise RecordRejected(f"sealed record out of sequence: number {seq}, expected {self.recv_seq} "
                                 f"(replayed, reordered, duplicated or dropped)")
        bound = MAX_BODY[rtype] if max_body is None else min(max_body, MAX_BODY[rtype])
        if not TAG <= length <= bound + TAG:
            raise RecordRejected(f"sealed {rtype.name} record of {length} bytes outside 16..{bound + TAG}")
        if only is not None and rtype not in only:
            raise ProtocolError(f"unexpected {rtype.name} record")
        counter = self.recv_seq if self.check_sequence else seq
        if sink is not None and rtype is RecordType.PAGES and pages_head_size(length - TAG):
            (head, *views), tag = self._open_pages(header, length, counter, deadline, sink, seq)
            self._advance(seq)
            return Record(rtype, head, seq, flags, tuple(views), tag)
        sealed = self._read_exact(length, deadline, f"a sealed {rtype.name} body")
        try:
            body = self._recv_aead.decrypt(record_nonce(self._recv_dir, counter), sealed, header)
        except InvalidTag:
            raise RecordRejected(f"{rtype.name} record number {seq} failed authentication "
                                 f"(modified, forged, replayed or out of order)") from None
        self._advance(seq)
        return Record(rtype, body, seq, flags, tag=bytes(sealed[-TAG:]))

    def _advance(self, seq: int) -> None:
        """A record ``seq`` was accepted: the next one expected (with the replay
        defence off, whatever came, the count only grows)."""
        self.recv_seq = max(self.recv_seq, seq) + 1 if not self.check_sequence else self.recv_seq + 1

    def _open_pages(self, header: bytes, length: int, counter: int, deadline: float, sink, seq: int):
        """A sealed PAGES record decrypted straight into the buffers ``sink``
        names (guest RAM): ([head, *buffers], its tag).  AES-GCM is a stream cipher, so
        the head (count, frame numbers) is decrypted first and the pages run
        by run into guest RAM; the tag is checked at the end, over the whole
        record.  Until then nothing of it counts: the caller marks the pages
        stored and digests them only after this returns, and a record that
        fails ends the session, which discards the RAM it was decrypted into
        (nothing is resumed from it).  A head the sink refuses is blamed on
        its content only if the record authenticates; otherwise it is a
        forgery like any other."""
        n = length - TAG
        hsize = pages_head_size(n)
        dec = Cipher(algorithms.AES(self._recv_key), modes.GCM(record_nonce(self._recv_dir, counter))).decryptor()
        dec.authenticate_additional_data(header)
        head = dec.update(bytes(self._read_exact(hsize, deadline, "a sealed PAGES head")))
        tag = bytearray(TAG)
        try:
            views = sink(head, n)
        except ProtocolError:
            if len(self._staging) < n - hsize:
                self._staging = bytearray(n - hsize)
            staging = memoryview(self._staging)[:n - hsize]
            self._read_into([staging, tag], deadline, "a sealed PAGES body")
            dec.update_into(staging, staging)
            self._authenticated(dec, tag, seq)
            raise
        # The ciphertext is read straight into the guest RAM it decrypts to and
        # decrypted there in place: no staging buffer to write and read back
        # (~7 % of the receive loop's CPU on 256 MiB), and the bytes are still
        # in the cache when the cipher reads them.
        views = [memoryview(v).cast("B") for v in views]
        self._read_into([*views, tag], deadline, "a sealed PAGES body")
        for v in views:
            dec.update_into(v, v)
        self._authenticated(dec, tag, seq)
        return [head, *views], bytes(tag)

    @staticmethod
    def _authenticated(dec, tag: bytearray, seq: int) -> None:
        try:
            dec.finalize_with_tag(bytes(tag))
        except InvalidTag:
            raise RecordRejected(f"PAGES record number {seq} failed authentication "
                                 f"(modified, forged, replayed or out of order)") from None

    def _recv_clear_any_seq(self, timeout, only, max_body) -> Record:
        """--insecure replay and encryption both off: any sequence number is taken."""
        saved = self.recv_seq
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        header = bytes(self._read_exact(HEADER.size, deadline, "a record header"))
        tcode, flags, length, seq = HEADER.unpack(header)
        try:
            rtype = RecordType(tcode)
        except ValueError:
            raise ProtocolError(f"unknown record type {tcode}") from None
        # INVALID has no bound (MAX_BODY): refused before the bound is looked up.
        bound = 0 if rtype is RecordType.INVALID else MAX_BODY[rtype] if max_body is None \
            else min(max_body, MAX_BODY[rtype])
        if rtype is RecordType.INVALID or length > bound:
            raise ProtocolError(f"record {tcode} of {length} bytes refused")
        if only is not None and rtype not in only:
            raise ProtocolError(f"unexpected {rtype.name} record")
        body = self._read_exact(length, deadline, f"a {rtype.name} body") if length else b""
        self.recv_seq = max(saved, seq + 1)
        return Record(rtype, body, seq, flags)

    def pending_abort(self) -> bool:
        """Whether an authenticated ABORT is waiting: a waiting record is read and
        authenticated (never judged by its raw header); anything else waiting
        before COMMIT is a protocol error."""
        if not self._aead_on:
            return super().pending_abort()
        try:
            self.sock.settimeout(0)
            head = self.sock.recv(HEADER.size, socket.MSG_PEEK)
        except (BlockingIOError, socket.timeout, TimeoutError, InterruptedError):
            return False
        except OSError:
            return False
        if not head:
            return False
        rec = self.recv(timeout=min(self.timeout, 1.0))
        if rec.type is RecordType.ABORT:
            self.pending_abort_record = rec
            return True
        raise ProtocolError(f"unexpected {rec.type.name} record before COMMIT")
