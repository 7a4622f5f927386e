"""The source side: pre-copy with the guest running, stop-and-copy, commit.

Threads: the guest runs on the calling thread in its ordinary slices; a
sender thread copies, digests and sends the current round's pages meanwhile.
Unicorn's ``emu_start`` runs with the GIL released (ctypes), so the two use
both cores.  The sender only *reads* guest RAM through the host buffer; every
Unicorn call -- slices, TLB flushes, the dirty-log fetch, ``seal_for_export``
-- happens on the guest's thread between slices, as DESIGN §8 demands.

Why the copy is right although the guest writes while it is taken: each
round fetches (and re-arms) the dirty log *before* its pages are copied, so a
page the guest writes during the copy faults in the TLB-fill hook, lands in
the next round's set and is sent again; the final round runs with the guest
paused.  Each page is copied once into a private buffer, then digested and
sent from that buffer, so the digest always describes the bytes on the wire.

Protected pages (DESIGN §5): ``seal_for_export`` runs before round 0 (before the
handshake, with round 0's copies of protected frames and its zero test), before
each round's dirty fetch and at pause, with the dirty log on, so every page
it cloaks is sent again.  It is a no-op until process protection lands.
Because the guest runs beside the sender, an owner can decrypt its page in
place at any instruction after a seal; so the frames that hold protected pages
(``Machine.protected_frames``) are copied on the guest's thread right after
the seal, between slices, and the sender sends those copies (ciphertext)
instead of reading them live.  No plaintext of a protected page is ever read
by the sender.

Failure semantics: anything that goes wrong before COMMIT is handed to the
kernel (a closed or silent peer, a bad record, ABORT, the guest crashing)
stops the sender, stops the dirty log and raises a :class:`MigrationError`;
the machine is untouched and simply keeps running.  After COMMIT the machine
is marked ``halted = "migrated"`` and can never run here again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
from concurrent.futures import Future, wait as futures_wait

import numpy as np

from minivmm.events import EventBus
from migrate import clock, events as mev
from migrate.digest import PageHashes, StreamDigest, hash_ram
from migrate.errors import (CommitUnconfirmed, ConnectionLost, GuestStopped, MigrationError,
                            PeerAborted, PeerTimeout, ProtocolError, Refused)
from migrate.messages import (STATUS_NAMES, STATUS_OK, Digest, Hello, Resumed, RoundMark, Welcome,
                              decode_reason, encode_reason, encode_zero_pages, pages_body,
                              pages_head)
from migrate.precopy import PrecopyPolicy
from migrate.prescan import Prescan
from migrate.report import MigrationReport, RoundStats
from migrate.residency import nonzero_pages, nonzero_run, untouched
from migrate.secure.mode import PlainMode
from migrate.wire import (MAX_BATCH, MAX_BODY, MAX_CHUNK, MAX_ZERO_BATCH, PAGE_SIZE, Channel, RecordType,
                          parse_address)

MIGRATED = "migrated"
# While a pre-copy round is sent, the guest gets this share of the time its
# thread could run: after a slice that took t seconds of CPU it waits
# t * (1 - share) / share for the sender (QEMU's auto-converge throttles
# vCPUs the same way).  On a 2-core host the guest's slices took as much CPU as
# the sender and the destination's receive together; every core they take is
# one the migration's pipeline waits for.  Lockstep pre-copy (round_ticks) holds
# the guest anyway.
PRECOPY_GUEST_SHARE = 0.25
# An idle guest (its slice ended at hlt, waiting for its next tick) gets less:
# virtual time jumps to that tick at once, so an idle guest's slices are empty
# ticks run as fast as the host allows, and at the busy share they took a
# quarter of a core from the migration for nothing the guest can tell apart
# (its results depend on virtual time only).  A real VMM's vCPU sleeps in hlt.
# Measured on a 256 MiB full-RAM idle guest, plain: its thread's CPU per migration
# 49 -> 16 ms, the migration's total 214 -> 200 ms (docs/migration.md, fourth pass).
PRECOPY_IDLE_SHARE = 0.05
ZERO_SCAN = 4096            # pages tested for zero at once in contiguous runs (16 MiB)


def _throttle(cpu: float, idle: bool) -> float:
    """How long the guest's thread waits after a slice begun at its CPU time
    ``cpu``, so that the guest gets PRECOPY_GUEST_SHARE of the thread's time
    (PRECOPY_IDLE_SHARE if that slice ended idle)."""
    share = PRECOPY_IDLE_SHARE if idle else PRECOPY_GUEST_SHARE
    return (time.thread_time() - cpu) * (1 - share) / share


ZERO_PAGE = bytes(PAGE_SIZE)      # a frame sent as zeros (late protected: _blank_late_protected)


class _Stopped(Exception):
    """Tells the sender thread to give up (the guest thread saw a failure)."""


class Source:
    def __init__(self, machine, *, policy: PrecopyPolicy | None = None, timeout: float = 10.0,
                 connect_timeout: float = 5.0, check_ram: bool = False, events: EventBus | None = None,
                 channel=None, mode=None, slice_gate=None):
        self.machine = machine
        # Entered around every guest slice this engine runs while it migrates
        # (a context manager; default: nothing).  The TUI passes one that a
        # step hook can close, so that while a student reads, the guest stops
        # between two slices instead of running on beside the held protocol
        # (docs/migration.md, "Protocol steps").
        self.slice_gate = slice_gate or contextlib.nullcontext()
        self.policy = policy or PrecopyPolicy()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.check_ram = check_ram
        self.mode = mode or PlainMode()     # the secure layer's seams (migrate/secure/mode.py)
        self.channel = channel or (lambda sock, timeout: self.mode.channel(sock, timeout=timeout, role="source"))
        self.events = events or EventBus()
        self.hashes = StreamDigest(machine.ram.npages)     # the completeness digest (migrate/digest.py)
        self.page_hashes = PageHashes(machine.ram.npages) if check_ram else None
        self._stop = threading.Event()
        self._body = bytearray(MAX_BODY[RecordType.PAGES])     # the PAGES record being sent (reused)
        self._protected = (np.zeros(0, dtype=np.int64), None)
        self._prescan: Prescan | None = None    # round 0's zero test, made beside the handshake
        self._round0_ready = False              # round 0's seal and protected copies taken (migrate())
        self._t0 = clock.now()

    def _emit(self, cls, **fields) -> None:
        self.events.emit(cls, self.machine.vclock, role="source", t=clock.now() - self._t0, **fields)

    # ------------------------------------------------------------------- main
    def migrate(self, address) -> MigrationReport:
        """Migrate the machine to ``address`` (``"HOST:PORT"`` or a tuple).

        Returns the report once the destination confirmed it resumed; raises
        :class:`MigrationError` (``.report`` attached) otherwise."""
        addr = parse_address(address) if isinstance(address, str) else tuple(address)
        peer = self._peer = f"{addr[0]}:{addr[1]}"
        m = self.machine
        if m.halted:
            raise GuestStopped(f"the guest has already stopped ({m.halted}); nothing to migrate")
        self._t0 = clock.now()
        report = MigrationReport(role="source", peer=peer, ram_size=m.ram.size, policy=self.policy.to_dict())
        self.report = report
        ch = None
        committed = False
        gc_was_on = False
        opened: list = []               # the channel, as soon as the helper thread has one
        try:
            # Round 0's local work overlaps the handshake: the dirty log starts,
            # protected pages are sealed and copied (ciphertext) on this thread,
            # and the zero test runs on another (migrate/prescan.py).  What the
            # guest writes from here on -- a page found zero, a protected page its
            # owner decrypts -- is dirty and goes again next round.
            # (Before the handshake thread starts, not beside it: the seal and the
            # copies are interpreter work, and beside the handshake they took the
            # GIL from it -- both ran slower, measured.)
            m.dirty_log_start()
            self._seal_round0()
            self._prescan = Prescan(m.ram.array.reshape(-1, PAGE_SIZE), m.ram.host_address,
                                    span=ZERO_SCAN, min_span=MAX_BATCH)
            try:
                # Connect and handshake beside the running guest: a peer that
                # never answers (any non-VMM server) must not freeze it.
                ch = self._beside_guest(lambda: self._open(addr, peer, opened),
                                        cancel=lambda: [c.close() for c in opened])
            finally:
                ch = ch or (opened[0] if opened else None)
            remaining = self._precopy(ch, report)
            gc_was_on = gc.isenabled()
            gc.disable()        # no collector pause inside the downtime
            # Phase deadline: from the pause to PREPARED.  A peer that reads
            # slowly (each record just inside the timeout) must not keep the
            # guest paused: past it the source aborts and resumes (DESIGN §6.4).
            ch.deadline = ch.now() + self.timeout
            self._stop_and_copy(ch, report, remaining)
            # Secure: process keys sealed away and destroyed, the migrated-away mark
            # made durable -- while the destination opens the keys and restores.
            self.mode.before_commit(m, peer)
            self._expect(ch, RecordType.PREPARED)
            self._emit(mev.Prepared)
            ch.deadline = None
            if ch.pending_abort():
                raise PeerAborted("destination aborted before COMMIT")
            # The point of no return: from here on this copy never runs again
            # unless the destination proves it will not resume (its ABORT).
            # Marked before the send: an interrupt during it must not resume us.
            committed = True
            m.halted, m.halt_detail = MIGRATED, f"migrated to {peer}"
            try:
                ch.send(RecordType.COMMIT, self.mode.commit_token())
            except MigrationError:
                # The send failed, so no whole COMMIT reached the destination
                # (a record is all or nothing to its parser): it cannot resume.
                # (_abort below gives the process keys back and undoes the mark.)
                m.halted, m.halt_detail = None, ""
                committed = False
                raise
            self._emit(mev.Committed)
            try:
                resumed = Resumed.decode(self._expect(ch, RecordType.RESUMED).body)
            except PeerAborted as exc:
                # The destination gave up before our COMMIT reached it (its own
                # wait for COMMIT timed out) and discarded the VM: it will
                # never resume, so this copy is the only one.  Take it back.
                # (Secure mode: that ABORT came sealed, from the destination;
                # _abort below gives the process keys back and undoes the mark.)
                m.halted, m.halt_detail = None, ""
                committed = False
                raise PeerAborted(f"{exc} (after COMMIT: the destination discarded the VM; "
                                  f"the guest resumes here)") from None
            t_confirm = clock.now()
            report.vclock_resume = resumed.vclock
            if resumed.boot_id == clock.boot_id():
                report.downtime_seconds = resumed.clock - self._t_pause
                report.downtime_method = "both VMMs on this host: one monotonic clock"
            else:
                report.downtime_seconds = t_confirm - self._t_pause
                report.downtime_method = "different hosts: upper bound, pause to RESUMED received"
            report.outcome = "completed"
            self._emit(mev.Resumed, vclock=resumed.vclock)
        except MigrationError as exc:
            if committed:
                err = CommitUnconfirmed(f"committed, but the destination did not confirm it resumed: {exc}")
                report.outcome, report.error = "commit-unconfirmed", str(err)
                err.report = report
                self._emit(mev.Aborted, reason=str(err))
                raise err from None
            self._abort(ch, report, exc)
            exc.report = report
            raise
        except BaseException as exc:                # a crashed guest, ^C, a VMM bug
            if not committed:
                self._abort(ch, report, exc)
            raise
        finally:
            if self._prescan is not None:       # ended before round 0 used it
                self._prescan.cancel()
                self._prescan = None
            if gc_was_on:
                gc.enable()
            report.total_seconds = clock.now() - self._t0
            report.mode, report.phases = self.mode.describe(), dict(self.mode.phases)
            if ch is not None:
                report.bytes_sent, report.bytes_received = ch.bytes_sent, ch.bytes_received
                ch.close()
        self._emit(mev.Completed, report=report.to_dict())
        return report

    def _abort(self, ch, report, exc) -> None:
        """Before COMMIT: tell the peer (best effort), give the guest back."""
        reason = f"{type(exc).__name__}: {exc}"
        self.mode.undo_commit(self.machine)     # secure: keys back from the TPM, mark undone
        if ch is not None and not isinstance(exc, (ConnectionLost, PeerAborted)):
            try:
                ch.timeout = min(ch.timeout, 1.0)
                ch.send(RecordType.ABORT, encode_reason(reason))
            except MigrationError:
                pass
        if self.machine.ram.dirty.enabled:
            self.machine.dirty_log_stop()
        report.outcome, report.error = "aborted", reason
        self._emit(mev.Aborted, reason=reason)

    def _expect(self, ch: Channel, rtype: RecordType):
        rec = ch.recv()
        if rec.type is RecordType.ABORT:
            raise PeerAborted(f"destination aborted: {decode_reason(rec.body)}")
        if rec.type is not rtype:
            raise ProtocolError(f"expected {rtype.name}, destination sent {rec.type.name}")
        return rec

    # -------------------------------------------------------------- handshake
    def _seal_round0(self) -> None:
        """On the guest's thread, before the handshake: round 0's seal and its
        copies of the protected frames (ciphertext), so that round 0 sends as soon
        as both ends are attested."""
        self.machine.seal_for_export()
        self._snapshot_protected(np.arange(self.machine.ram.npages, dtype=np.int64))
        self._round0_ready = True

    def _beside_guest(self, work, *, cancel, when="before the migration began", name="migrate-handshake"):
        """Run ``work()`` on a helper thread while the guest keeps running its
        slices on this thread (the only one that calls into Unicorn); return
        its result or raise its exception.  If the guest stops or fails
        first, ``cancel()`` unblocks the helper (closes its socket); ``when``
        says in the error when that happened."""
        done: Future = Future()

        def body():
            try:
                done.set_result(work())
            except BaseException as exc:        # noqa: BLE001 - handed to the guest thread
                done.set_exception(exc)
        threading.Thread(target=body, name=name, daemon=True).start()
        return self._guest_until(done, cancel=cancel, when=when)

    def _guest_until(self, done: Future, *, cancel=lambda: None, when: str):
        """Run the guest's slices until ``done`` (a future) is; its result."""
        m = self.machine
        lockstep = bool(self.policy.round_ticks)     # the guest waits for the work
        try:
            while not done.done():
                if m.halted:
                    raise GuestStopped(f"the guest stopped ({m.halted}) {when}; it finished on the source")
                if lockstep:
                    futures_wait((done,), 0.01)
                    continue
                cpu = time.thread_time()
                with self.slice_gate:
                    m.step()
                if not done.done():     # throttled as in a pre-copy round
                    futures_wait((done,), _throttle(cpu, m.idle))
                time.sleep(0)
        except BaseException:
            cancel()
            futures_wait((done,), self.connect_timeout + 1)
            raise
        return done.result()

    def _open(self, addr, peer: str, opened: list) -> Channel:
        """On the helper thread: connect, HELLO, WELCOME."""
        try:
            sock = socket.create_connection(addr, timeout=self.connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {peer}: {exc.strerror or exc}") from None
        ch = self.channel(sock, timeout=self.timeout)
        opened.append(ch)
        self._emit(mev.Connected, peer=peer)
        self._handshake(ch, peer)
        return ch

    def _handshake(self, ch: Channel, peer: str) -> None:
        m = self.machine
        info = {"vm": m.image.name, "vclock": m.vclock, "source": socket.gethostname(),
                **self.mode.hello_info(m)}
        hello = Hello(m.ram.size, info).encode()
        ch.send(RecordType.HELLO, hello)
        try:
            self.mode.source_handshake(ch, hello)   # secure: key exchange + mutual attestation
            rec = self._expect(ch, RecordType.WELCOME)
        except (PeerTimeout, ConnectionLost) as exc:
            if ch.recv_seq:         # it answered: a failure later in the handshake, said as it is
                raise
            if isinstance(exc, PeerTimeout):
                raise PeerTimeout(f"{peer} accepted the connection but did not answer HELLO: it does "
                                  f"not speak the minivmm migration protocol ({exc})") from None
            raise ConnectionLost(f"{peer} hung up without answering HELLO: it does not speak the "
                                 f"minivmm migration protocol ({exc})") from None
        welcome = Welcome.decode(rec.body)
        if welcome.status != STATUS_OK:
            raise Refused(f"destination {peer} refused the migration "
                          f"({STATUS_NAMES[welcome.status]}): {welcome.reason}")
        self._emit(mev.Handshake, peer=peer, ram_size=m.ram.size, info=info,
                   attestation=mev.attestation_fields(getattr(self.mode, "peer", None)))

    # --------------------------------------------------------------- pre-copy
    def _precopy(self, ch: Channel, report: MigrationReport) -> np.ndarray:
        m = self.machine
        # (the dirty log runs, and round 0's pages were sealed, before the handshake: migrate())
        pfns = np.arange(m.ram.npages, dtype=np.int64)        # round 0: everything
        rnd = 0
        cost = None
        while True:
            stats = self._round(ch, rnd, pfns, final=False)
            if m.halted:
                raise GuestStopped(f"the guest stopped ({m.halted}) during pre-copy; it finished on the source")
            m.seal_for_export()
            dirty = m.dirty_log_fetch().astype(np.int64)
            stats.dirtied = len(dirty)
            report.rounds.append(stats)
            cost = stats.cost_per_page or cost
            self._emit(mev.RoundFinished, round=rnd, pages=stats.pages, data_pages=stats.data_pages,
                       zero_pages=stats.zero_pages, bytes=stats.bytes, seconds=stats.seconds,
                       dirtied=stats.dirtied, dirty_rate=stats.dirty_rate)
            decision = self.policy.decide(rounds_done=rnd + 1, remaining=len(dirty), cost_per_page=cost,
                                          bytes_sent=ch.bytes_sent, ram_size=m.ram.size)
            if decision.stop:
                # Secure: the last round's final quote, verified while the guest
                # still runs (what it dirties meanwhile is fetched at the pause).
                pending = self.mode.before_pause()     # secure: a future, already running
                if pending is not None:
                    self._guest_until(pending, when="during pre-copy")
                report.stop_reason = decision.reason
                report.target_met = decision.target_met
                report.estimated_pages_seconds = decision.estimate
                self._emit(mev.StopAndCopy, reason=decision.reason, remaining=len(dirty))
                return dirty
            pfns, rnd = dirty, rnd + 1

    def _snapshot_protected(self, pfns: np.ndarray) -> None:
        """On the guest's thread, right after ``seal_for_export``: private
        copies of this round's protected frames, all ciphertext now."""
        # Both are increasing (protected_frames sorted, a round's frames ascending):
        # a binary search per protected frame.  (np.intersect1d made both unique
        # first, a hash pass over all of RAM's frame numbers: 20-50 ms on the guest's
        # thread per round, and round 0's before the connection is opened.)
        frames = np.asarray(self.machine.protected_frames(), dtype=np.int64)
        pos = np.searchsorted(pfns, frames)
        hit = pos < len(pfns)
        hit[hit] = pfns[pos[hit]] == frames[hit]
        prot = frames[hit]
        self._protected = (prot, self.machine.ram.array.reshape(-1, PAGE_SIZE)[prot])

    def _overlay_protected(self, sel: np.ndarray, data: np.ndarray) -> None:
        """Replace the rows of ``data`` (copies of frames ``sel``) that are
        protected frames by their post-seal copies."""
        prot, copies = self._protected
        if not len(prot):
            return
        pos = np.searchsorted(prot, sel)
        hit = pos < len(prot)
        hit[hit] = prot[pos[hit]] == sel[hit]
        if hit.any():
            data[hit] = copies[pos[hit]]

    def _blank_late_protected(self, sel: np.ndarray, data: np.ndarray) -> None:
        """After copying: any frame outside this round's protected snapshot
        that was protected at *any* moment since the snapshot may have been
        copied in plaintext, even if it is not protected any more by now (its
        owner exited and its entry was dropped).  The record of "at any
        moment" is the dirty log: protection marks every frame it takes on
        (HC_PROTECT, a page adopted, a page decrypted into a new frame) dirty
        before anything protected is in it, and the bit stays set until the
        guest's thread fetches the log, after this round's sender is done.
        So every copied frame whose bit is set now is sent as zeros (the
        round still carries every page it announced); it goes again next
        round (sealed, if protected), and the destination's digest counts
        only the last copy.  The guest dirtied those pages anyway: the zeros
        cost nothing that the next round would not resend.  Frames protected
        now count too (belt and braces: a frame in ``protection.frames`` whose
        bit was cleared by a fetch belongs to the snapshot)."""
        late = self._late_protected(sel)
        if late.any():
            data[late] = 0

    def _late_protected(self, sel: np.ndarray) -> np.ndarray:
        """Which frames of ``sel`` may have held protected content since the
        snapshot (see _blank_late_protected): ask after the read."""
        m = self.machine
        late = m.ram.dirty.bitmap[sel].copy()
        if m.protection.frames:
            late |= np.fromiter((m.is_protected_frame(int(f)) for f in sel), dtype=bool, count=len(sel))
        snap = self._protected[0]
        if len(snap):
            late &= ~np.isin(sel, snap)
        return late

    def _sealed_from_ram(self, ch: Channel, s: np.ndarray, pages: np.ndarray, final: bool) -> bool:
        """Secure mode: send the PAGES record of frames ``s`` sealed straight
        from guest RAM, without the private copy (the sender's third pass over
        the bytes, about a fifth of its time on a full-RAM guest).  The body
        is read in pieces: each run of consecutive frames from RAM, each
        frame of this round's protected snapshot from its sealed copy (as the
        copy path overlays it).  The record goes only if no other frame of it
        was protected meanwhile -- asked after the encryption read them, as the
        copy path asks after its copy; otherwise nothing was sent and the
        caller copies, blanking that frame.  Returns whether the record went.
        (Not with a step hook, which shows the body as sent: only a copy
        holds still; nor with ``check_ram``, whose hashes need the bytes.)"""
        if not ch.seals_pages or ch.on_step is not None or self.page_hashes is not None:
            return False
        prot, copies = self._protected
        # Frames late already (dirty: see _blank_late_protected) go as zeros from
        # the start; dirty bits are only set until the guest's thread fetches the
        # log after this round, so only a frame turning late during the read
        # below can make the record go from a copy instead.
        blank = np.zeros(len(s), dtype=bool) if final else self._late_protected(s)
        hit = np.zeros(len(s), dtype=bool)
        if len(prot):
            pos = np.searchsorted(prot, s)
            hit = pos < len(prot)
            hit[hit] = prot[pos[hit]] == s[hit]
        odd = hit | blank                       # a frame of its own: its copy, or zeros
        cut = (np.diff(s) != 1) | odd[1:] | odd[:-1]
        pieces, a = [], 0
        for b in [*(np.flatnonzero(cut) + 1).tolist(), len(s)]:
            if hit[a]:
                pieces.append(copies[pos[a]])
            elif blank[a]:
                pieces.append(ZERO_PAGE)
            else:
                first = int(s[a])
                pieces.append(pages[first:first + b - a].reshape(-1))
            a = b
        if final:                               # paused: nothing changes under the read
            keep = None
        else:
            keep = lambda: not (self._late_protected(s) & ~blank).any()     # noqa: E731
        return ch.send_pages_from(pages_head(self._body, s), pieces, keep=keep)

    def _round(self, ch: Channel, rnd: int, pfns: np.ndarray, *, final: bool) -> RoundStats:
        stats = RoundStats(rnd, len(pfns), final=final)
        if rnd == 0 and self._round0_ready:
            self._round0_ready = False          # sealed and copied before the handshake
        else:
            self._snapshot_protected(pfns)
        self._emit(mev.RoundStarted, round=rnd, pages=len(pfns))
        # Round timings on the channel's clock (migrate/steps.py): it is the
        # monotonic clock unless a step hook holds the engine (the TUI while a
        # student reads), and that held time is no cost of sending pages: the
        # pre-copy policy must decide on the engine's own work.
        t, b0 = ch.now(), ch.bytes_sent
        if final:
            self._send_pages(ch, rnd, pfns, stats)
        else:
            self._stop.clear()
            failure: list[BaseException] = []

            def sender():
                try:
                    self._send_pages(ch, rnd, pfns, stats)
                except BaseException as exc:    # noqa: BLE001 - handed to the guest thread
                    failure.append(exc)
            th = threading.Thread(target=sender, name="migrate-sender", daemon=True)
            th.start()
            m = self.machine
            # With round_ticks N (migrate/precopy.py) pre-copy runs in lockstep: the
            # guest waits while the round is sent, then runs exactly N ticks.  What
            # a round copies and dirties is then the guest's doing alone, on any machine.
            n = self.policy.round_ticks
            until = None
            try:
                while True:                     # at least one slice per round: the guest keeps running
                    if m.halted:
                        raise GuestStopped(f"the guest stopped ({m.halted}) during pre-copy; "
                                           f"it finished on the source")
                    if n and until is None and th.is_alive():
                        th.join(0.01)           # lockstep: the round's pages first
                    else:
                        cpu = time.thread_time()
                        with self.slice_gate:
                            m.step()
                        if th.is_alive():       # throttled while the round is sent
                            th.join(_throttle(cpu, m.idle))
                    if failure:
                        break
                    if not th.is_alive():
                        until = m.ticks + n if until is None else until
                        if m.ticks >= until:
                            break
                    time.sleep(0)   # hand the GIL to the sender now, not after the 5 ms switch interval
            except BaseException:
                self._stop.set()
                th.join(0.5)
                if th.is_alive():           # blocked on a peer that stopped reading: unblock it
                    ch.close()
                    th.join()
                raise
            th.join()
            if failure and not isinstance(failure[0], _Stopped):
                raise failure[0]
        stats.seconds = ch.now() - t
        stats.bytes = ch.bytes_sent - b0
        return stats

    def _send_pages(self, ch: Channel, rnd: int, pfns: np.ndarray, stats: RoundStats) -> None:
        final = stats.final
        if not final:
            self.mode.round_begins(ch)      # secure: a fresh nonce; the destination quotes meanwhile
        ch.send(RecordType.ROUND_BEGIN, RoundMark(rnd, len(pfns)).encode())
        pages = self.machine.ram.array.reshape(-1, PAGE_SIZE)
        fresh, masks = None, None
        if rnd == 0 and self._prescan is not None:      # tested beside the handshake
            fresh, masks = self._prescan.result()
            self._prescan = None
        elif len(pfns) > ZERO_SCAN:
            fresh = untouched(self.machine.ram.host_address, self.machine.ram.npages)
        zeros: list[np.ndarray] = []
        nzeros = 0
        prot = self._protected[0]
        for idx, nz, data in self._chunks(pages, pfns, fresh, masks):
            if len(prot):       # protected frames go as their sealed copies, never as "zero"
                nz = nz | np.isin(idx, prot)
            if not nz.all():
                zeros.append(idx[~nz])
                nzeros += len(zeros[-1])
                if nzeros >= MAX_ZERO_BATCH:
                    self._send_zeros(ch, zeros, stats)
                    zeros, nzeros = [], 0
            if not nz.any():
                continue
            ts = ch.now()
            sel = idx[nz]
            copies = None if data is None else data[nz]
            for b in range(0, len(sel), MAX_BATCH):
                s = sel[b:b + MAX_BATCH]
                if copies is None and self._sealed_from_ram(ch, s, pages, final):
                    self.hashes.update(s, None, tag=ch.sent_tag)    # sealed: its AEAD tag stands for the pages
                    stats.data_pages += len(s)
                    continue
                # The private copy goes straight into the record's body (one
                # reused buffer): then digested and sent as one.
                body, d = pages_body(self._body, s)
                if copies is not None:
                    d[:] = copies[b:b + MAX_BATCH]
                elif int(s[-1]) - int(s[0]) + 1 == len(s):
                    d[:] = pages[int(s[0]):int(s[-1]) + 1]
                else:
                    np.take(pages, s, axis=0, out=d)
                if not final:           # paused: nothing changes under the copy
                    self._blank_late_protected(s, d)
                self._overlay_protected(s, d)
                if self.page_hashes is not None:
                    self.page_hashes.update(s, d)
                ch.send(RecordType.PAGES, body)
                self.hashes.update(s, d, tag=ch.sent_tag)    # sealed: its AEAD tag (migrate/digest.py)
                stats.data_pages += len(s)
            stats.send_seconds += ch.now() - ts
        if zeros:
            self._send_zeros(ch, zeros, stats)
        ch.send(RecordType.ROUND_END, RoundMark(rnd, len(pfns)).encode())
        # Wait until the destination has stored and digested the round: what is
        # still in flight (up to the socket buffers, megabytes) is work the
        # stop-and-copy would otherwise inherit, so it counts in the cost.
        ts = ch.now()
        ack = RoundMark.decode(self._expect(ch, RecordType.ROUND_ACK).body, "ROUND_ACK")
        if ack != RoundMark(rnd, len(pfns)):
            raise ProtocolError(f"ROUND_ACK {ack} does not match round {rnd} of {len(pfns)} pages")
        stats.send_seconds += ch.now() - ts
        if not final:
            self.mode.round_acked(ch)       # secure: that quote, verified while the guest runs

    def _chunks(self, pages: np.ndarray, pfns: np.ndarray, fresh, masks=None):
        """Yield (frames, nonzero mask, private copy or None) over ``pfns``.

        Long contiguous runs (round 0) are tested for zero in place, without
        a copy, ZERO_SCAN pages at a time; frames the host never backed are
        zero without being read; ``masks`` (round 0: migrate/prescan.py) holds
        the test of a run made earlier, keyed by its first frame.  A page found
        zero and written right after is dirty and goes again next round.
        Other sets are copied first and tested on the copy."""
        start, n = 0, len(pfns)
        while start < n:
            if self._stop.is_set():
                raise _Stopped()
            first = int(pfns[start])
            span = min(ZERO_SCAN, n - start)
            if span > MAX_BATCH and int(pfns[start + span - 1]) - first + 1 == span:
                nz = masks.get(first) if masks else None
                if nz is None or len(nz) != span:
                    nz = nonzero_run(pages, first, span, fresh)
                yield pfns[start:start + span], nz, None
                start += span
                continue
            idx = pfns[start:start + MAX_BATCH]
            start += len(idx)
            data = pages[idx]
            yield idx, nonzero_pages(data), data

    def _send_zeros(self, ch: Channel, zeros: list[np.ndarray], stats: RoundStats) -> None:
        z = np.concatenate(zeros)
        if self.page_hashes is not None:
            self.page_hashes.update_zero(z)
        for b in range(0, len(z), MAX_ZERO_BATCH):
            self.hashes.update_zero(z[b:b + MAX_ZERO_BATCH])    # one record, one fold
            ch.send(RecordType.ZERO_PAGES, encode_zero_pages(z[b:b + MAX_ZERO_BATCH]))
        stats.zero_pages += len(z)

    # ---------------------------------------------------------- stop-and-copy
    def _stop_and_copy(self, ch: Channel, report: MigrationReport, remaining: np.ndarray) -> None:
        m = self.machine
        self._t_pause = clock.now()         # the guest runs no further slice here
        self.mode.at_pause(m, self._peer)   # secure: keys escrowed, mark made durable, meanwhile
        report.vclock_pause = m.vclock
        m.seal_for_export()
        mask = np.zeros(m.ram.npages, dtype=bool)
        mask[remaining] = True
        mask[m.dirty_log_fetch()] = True
        final = np.flatnonzero(mask)
        m.dirty_log_stop()
        stats = self._round(ch, len(report.rounds), final, final=True)
        report.rounds.append(stats)
        if self.check_ram:
            actual = hash_ram(m.ram.array)
            bad = np.flatnonzero((actual != self.page_hashes.hashes).any(axis=1))
            if len(bad):
                raise MigrationError(f"{len(bad)} pages differ from what was sent (first: frame "
                                     f"{int(bad[0])}): the dirty log missed a write")
        public, secret = self.mode.split_state(m.save_state(ram=False).to_doc())
        doc = json.dumps(public, sort_keys=True, separators=(",", ":")).encode()
        for off in range(0, len(doc), MAX_CHUNK):
            ch.send(RecordType.STATE, doc[off:off + MAX_CHUNK])
        digest = self.hashes.final(doc)
        ch.send(RecordType.DIGEST, Digest(len(doc), digest).encode())
        self.mode.source_final(ch, secret)          # secure: the keys, to the quoted release key
        report.state_bytes = len(doc)
        self._emit(mev.StateSent, state_bytes=len(doc), digest=digest.hex())
