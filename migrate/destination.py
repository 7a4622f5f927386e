"""The destination side: receive, verify, rebuild, and resume exactly once.

:meth:`Destination.receive` runs the destination's state machine (see the
diagram in ``migrate/wire.py``) over one :class:`Channel`.  It enforces, in
this order, for every record: the record layer's bounds and sequence
numbers; that the type is allowed in the current state; the body's own
checks (``migrate/messages.py``); and the cross-record rules -- rounds
numbered 0, 1, 2, ... with exactly the announced number of pages, the state
document within what a machine state of that RAM size can need and exactly
``state_len`` bytes, every page received at least once, and the final digest
equal to the one computed over what was stored.  Then the state document is
parsed within bounds and validated field by field (``migrate/statecheck.py``)
before anything else reads it.  Only then is the machine rebuilt
(``Machine.restore`` adopting the received RAM), PREPARED sent, and COMMIT
awaited.  Any failure
before COMMIT raises :class:`MigrationError` and drops everything received:
nothing is resumed.  On COMMIT the destination resumes (returns the machine)
and tells the source when, so the source can measure the downtime.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from minivmm.errors import StateError, VmmError
from minivmm.events import EventBus
from minivmm.machine import Machine
from minivmm.memory import GuestRAM
from minivmm.state import MachineState
from migrate import clock, events as mev
from migrate.digest import StreamDigest
from migrate.landing import Landing
from migrate.errors import (DigestMismatch, InternalError, MigrationError, PeerAborted, ProtocolError,
                            Unsupported, VersionMismatch)
from migrate.messages import (STATUS_OK, STATUS_UNSUPPORTED, STATUS_VERSION, Digest, Hello, Resumed, RoundMark, Welcome, decode_pages,
                              decode_reason, decode_zero_pages, encode_reason)
from migrate.report import MigrationReport, RoundStats
from migrate.residency import Prefaulter
from migrate.secure.mode import PlainMode
from migrate.statecheck import check_state_doc, parse_state, state_limit
from migrate.steps import real_deadline
from migrate.wire import PAGE_SIZE, Channel, RecordType

MAX_ROUNDS = 10_000
MIN_SESSION_RATE = 2 << 20  # bytes/s: a session slower than this on average is cut off


def session_limit(ram_size: int, timeout: float, min_rate: float = MIN_SESSION_RATE) -> float:
    """Seconds one incoming migration may take in all: a few timeouts for the
    handshake and the phases, plus moving RAM three times over (the source's
    default byte bound) at ``min_rate`` bytes per second."""
    return 6 * timeout + 3 * ram_size / min_rate

WAIT_HELLO, PRECOPY, IN_ROUND, STATE, PREPARED = "wait-hello", "precopy", "in-round", "state", "prepared"
ALLOWED = {
    WAIT_HELLO: {RecordType.HELLO},
    PRECOPY: {RecordType.ROUND_BEGIN, RecordType.STATE},
    IN_ROUND: {RecordType.PAGES, RecordType.ZERO_PAGES, RecordType.ROUND_END},
    STATE: {RecordType.STATE, RecordType.DIGEST},
    PREPARED: {RecordType.COMMIT},
}


@dataclass
class Incoming:
    """A VM that arrived whole and was resumed (the caller runs it)."""
    machine: Machine
    hello: Hello
    report: MigrationReport
    resumed_at: float


class Destination:
    def __init__(self, *, timeout: float = 10.0, events: EventBus | None = None,
                 min_rate: float = MIN_SESSION_RATE, mode=None, reserve=None):
        self.mode = mode or PlainMode()     # the secure layer's seams (migrate/secure/mode.py)
        # Guest RAM backed before the source's HELLO (migrate/reserve.py), or None:
        # fresh RAM, backed region by region while pages arrive (Prefaulter).
        self.reserve = reserve
        self.timeout = timeout
        self.min_rate = min_rate
        self.events = events or EventBus()
        self._t0 = clock.now()
        self._vclock = 0
        self._prefault = None
        # Observable progress, for a viewer on a step hook (the TUI's memory
        # map): the RAM being filled, its completeness digest (``seen``: arrived at
        # least once) and, once restored at DIGEST, the machine.  Read-only.
        self.ram = self.hashes = self.machine = None

    def _emit(self, cls, **fields) -> None:
        self.events.emit(cls, self._vclock, role="destination", t=clock.now() - self._t0, **fields)

    def receive(self, ch: Channel, peer: str = "?") -> Incoming:
        """Receive one VM over ``ch``; raises :class:`MigrationError` and
        discards everything if it does not arrive whole and committed."""
        self._t0 = clock.now()
        ch.timeout = self.timeout
        report = MigrationReport(role="destination", peer=peer, ram_size=0, mode=self.mode.describe())
        try:
            try:
                incoming = self._receive(ch, peer, report)
            except MigrationError:
                raise
            except Exception as exc:        # a VMM bug: discard the VM, keep serving
                raise InternalError(f"internal error while receiving: {type(exc).__name__}: {exc}") from exc
        except MigrationError as exc:
            if not isinstance(exc, PeerAborted):
                try:                                    # best effort: tell the source why
                    ch.timeout = min(ch.timeout, 1.0)
                    ch.send(RecordType.ABORT, encode_reason(f"{type(exc).__name__}: {exc}"))
                except MigrationError:
                    pass
            self.mode.discarded()           # secure: the generation's NV write, if any, is durable
            report.outcome, report.error = "aborted", f"{type(exc).__name__}: {exc}"
            report.phases = dict(self.mode.phases)
            report.total_seconds = clock.now() - self._t0
            exc.report = report
            self._emit(mev.Aborted, reason=report.error)
            raise
        return incoming

    # ------------------------------------------------------------------ core
    def _receive(self, ch: Channel, peer: str, report: MigrationReport) -> Incoming:
        gc_was_on = gc.isenabled()
        gc.disable()        # receiving makes no cycles; keep collector pauses out of the downtime
        try:
            return self._receive_records(ch, peer, report)
        finally:
            if self._prefault is not None:
                self._prefault.stop()
            if gc_was_on:
                gc.enable()

    def _receive_records(self, ch: Channel, peer: str, report: MigrationReport) -> Incoming:
        state = WAIT_HELLO
        ram: GuestRAM | None = None
        hashes: StreamDigest | None = None
        npages = 0
        rnd = None                   # current round mark
        round_pages = 0
        next_round = 0
        doc = bytearray()
        hello = None
        stats = None
        prefault = None
        landing = None

        def room(pfns):             # before a placed record's pages are read
            if round_pages + len(pfns) > rnd.pages:
                raise ProtocolError(f"round {rnd.round} carries more than the {rnd.pages} pages it announced")
            prefault.pages_coming(pfns)
        while True:
            # In a round, PAGES land straight in guest RAM (migrate/landing.py).
            rec = ch.recv(sink=landing if state is IN_ROUND else None)
            if rec.type is RecordType.ABORT:
                raise PeerAborted(f"source aborted: {decode_reason(rec.body)}")
            if state in (PRECOPY, IN_ROUND, STATE) and self.mode.take(ch, rec):
                continue                                # secure: FRESH_NONCE, a final quote starts
            if rec.type not in ALLOWED[state]:
                raise ProtocolError(f"unexpected {rec.type.name} record in state {state}")
            t = rec.type
            if t is RecordType.HELLO:
                try:
                    hello = Hello.decode(rec.body)
                except (VersionMismatch, Unsupported) as exc:   # a minivmm peer: say why
                    status = STATUS_VERSION if isinstance(exc, VersionMismatch) else STATUS_UNSUPPORTED
                    ch.send(RecordType.WELCOME, Welcome(status, str(exc)).encode())
                    raise
                mapping, backed = self.reserve.take(hello.ram_size) if self.reserve else (None, False)
                ram = GuestRAM(hello.ram_size, mapping=mapping)
                prefault = self._prefault = Prefaulter(ram.host_address, ram.npages, backed=backed)
                npages = ram.npages
                hashes = StreamDigest(npages)
                self.ram, self.hashes = ram, hashes
                written = np.zeros(npages, dtype=bool)      # pages holding received data
                landing = Landing(ram.array, npages, room)
                max_state = state_limit(hello.ram_size)
                report.ram_size = hello.ram_size
                # The whole session is bounded too: a source that sends one
                # small record just inside the timeout, forever, must not keep
                # this destination busy (and every other source refused).
                ch.deadline = ch.now() + session_limit(hello.ram_size, self.timeout, self.min_rate)
                self.mode.destination_handshake(ch, hello, rec.body)    # secure: keys + attestation
                ch.send(RecordType.WELCOME, Welcome(STATUS_OK).encode())
                self._emit(mev.Handshake, peer=peer, ram_size=hello.ram_size, info=hello.info,
                           attestation=mev.attestation_fields(getattr(self.mode, "peer", None)))
                state = PRECOPY
            elif t is RecordType.ROUND_BEGIN:
                rnd = RoundMark.decode(rec.body, "ROUND_BEGIN")
                if rnd.round != next_round or rnd.round >= MAX_ROUNDS:
                    raise ProtocolError(f"ROUND_BEGIN {rnd.round}, expected round {next_round}")
                if rnd.pages > npages:
                    raise ProtocolError(f"round {rnd.round} announces {rnd.pages} pages, RAM has {npages}")
                round_pages = 0
                stats = RoundStats(rnd.round, rnd.pages)
                t_round = clock.now()
                self._emit(mev.RoundStarted, round=rnd.round, pages=rnd.pages)
                state = IN_ROUND
            elif t is RecordType.PAGES:
                if rec.placed:                  # already in RAM, whole (and authenticated)
                    pfns = landing.pfns
                    hashes.update_views(pfns, rec.placed, tag=rec.tag)
                    size = len(rec.body) + PAGE_SIZE * len(pfns)    # (the body is the head: the pages are in RAM)
                else:                           # not placed: a body that fits no whole number of pages
                    pfns, data = decode_pages(rec.body, npages)
                    room(pfns)
                    ram.array.reshape(-1, 4096)[pfns] = data
                    hashes.update(pfns, data, tag=rec.tag)     # folded in arrival order (GMAC or AEAD tag)
                    size = len(rec.body)
                round_pages += len(pfns)
                written[pfns] = True
                stats.data_pages += len(pfns)
                stats.bytes += size
            elif t is RecordType.ZERO_PAGES:
                pfns = decode_zero_pages(rec.body, npages)
                round_pages += len(pfns)
                if round_pages > rnd.pages:
                    raise ProtocolError(f"round {rnd.round} carries more than the {rnd.pages} pages it announced")
                # Fresh RAM is already zero: only clear pages that got data
                # in an earlier round (touching all of it would cost ~40 ms
                # per 64 MiB of page faults, and the source would run ahead).
                stale = pfns[written[pfns]]
                if len(stale):
                    ram.array.reshape(-1, 4096)[stale] = 0
                    written[stale] = False
                hashes.update_zero(pfns)
                stats.zero_pages += len(pfns)
                stats.bytes += len(rec.body)
            elif t is RecordType.ROUND_END:
                end = RoundMark.decode(rec.body, "ROUND_END")
                if end != rnd or round_pages != rnd.pages:
                    raise ProtocolError(f"ROUND_END {end.round}/{end.pages} does not close round "
                                        f"{rnd.round} ({round_pages} of {rnd.pages} pages received)")
                ch.send(RecordType.ROUND_ACK, end.encode())
                self.mode.round_ended(ch)               # secure: FINAL_QUOTE, if this round asked for it
                stats.seconds = clock.now() - t_round
                report.rounds.append(stats)
                self._emit(mev.RoundFinished, round=rnd.round, pages=rnd.pages, data_pages=stats.data_pages,
                           zero_pages=stats.zero_pages, bytes=stats.bytes, seconds=stats.seconds,
                           dirtied=0, dirty_rate=0.0)
                next_round += 1
                state = PRECOPY
            elif t is RecordType.STATE:
                if not rec.body:
                    raise ProtocolError("empty STATE record")
                if len(doc) + len(rec.body) > max_state:
                    raise ProtocolError(f"state document exceeds the {max_state} bytes a machine state of "
                                        f"{hello.ram_size >> 20} MiB can need")
                doc += rec.body
                state = STATE
            elif t is RecordType.DIGEST:
                prefault.stop()
                machine = self.machine = self._prepare(Digest.decode(rec.body), doc, hashes, ram, hello, ch)
                report.state_bytes = len(doc)
                if report.rounds:
                    report.rounds[-1].final = True
                ch.send(RecordType.PREPARED)
                self._emit(mev.Prepared)
                state = PREPARED
            elif t is RecordType.COMMIT:
                self.mode.check_commit(rec.body)        # secure: the commit token
                resumed_at = clock.now()
                self._vclock = machine.vclock
                report.vclock_resume = report.vclock_pause = machine.vclock
                report.outcome = "completed"
                report.total_seconds = resumed_at - self._t0
                report.bytes_sent, report.bytes_received = ch.bytes_sent, ch.bytes_received
                report.phases = dict(self.mode.phases)
                self._emit(mev.Committed)
                try:            # the source has committed: we run it whatever happens to this reply
                    ch.send(RecordType.RESUMED, Resumed(machine.vclock, resumed_at, clock.boot_id()).encode())
                except MigrationError:
                    pass
                self.mode.resumed(machine)              # secure: the VM carries its identity on
                self._emit(mev.Resumed, vclock=machine.vclock)
                return Incoming(machine, hello, report, resumed_at)

    def _prepare(self, digest: Digest, doc: bytearray, hashes: StreamDigest, ram: GuestRAM, hello: Hello,
                 ch: Channel) -> Machine:
        if digest.state_len != len(doc):
            raise DigestMismatch(f"state document of {len(doc)} bytes, the source sent {digest.state_len}")
        missing = hashes.missing()
        if missing:
            first = int(np.flatnonzero(~hashes.seen)[0])
            raise DigestMismatch(f"{missing} pages never arrived (first: frame {first})")
        if hashes.final(doc) != digest.digest:
            raise DigestMismatch("final digest mismatch: the VM did not arrive whole")
        # Parsed within bounds and checked field by field (migrate/statecheck.py)
        # before MachineState or the VMM sees a byte of it, and before the
        # secure mode asks for the process keys.
        public = parse_state(doc, hello.ram_size, real_deadline(ch, ch.deadline))
        secret = self.mode.destination_final(ch)        # secure: the keys (TPM unseal)
        parsed = self.mode.merge_state(public, secret)
        if parsed is not public:                        # the secret part is hostile input too
            check_state_doc(parsed, hello.ram_size)
        try:
            st = MachineState.from_doc(parsed, hello.ram_size, where="migrated state")
            return Machine.restore(st, ram=ram)
        except (StateError, VmmError, ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"state document rejected: {exc}") from None
        except Exception as exc:       # noqa: BLE001 - a hostile document must not crash us
            raise ProtocolError(f"state document rejected: {type(exc).__name__}: {exc}") from None
