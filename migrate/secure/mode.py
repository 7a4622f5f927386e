"""The mode: what the engine calls at its fixed points (DESIGN §6).

``source.py``, ``destination.py`` and ``server.py`` call these and nothing
else of the secure layer:

=======================  ======================================  =====================
seam                      where                                   plain mode
=======================  ======================================  =====================
``channel(sock, ...)``    a connection becomes a record channel   ``wire.Channel``
``hello_info(machine)``   fields added to HELLO's info            ``{}``
``source_handshake``      source, after HELLO, before WELCOME     nothing
``destination_handshake`` destination, after HELLO, before WELCOME nothing
``round_begins(ch)``      source, before each pre-copy round      nothing
``round_acked(ch)``       source, after a pre-copy round's ACK    nothing
``round_ended(ch)``       destination, after sending ROUND_ACK    nothing
``before_pause()``        source, last round done, guest running  ``None``
``at_pause(machine, peer)`` source, the guest just paused         nothing
``take(ch, rec)``         destination, a record outside the engine ``False`` (not ours)
``split_state(doc)``      source, the state document at pause     ``(doc, None)``
``source_final``          source, after DIGEST, before PREPARED   nothing
``destination_final``     destination, digest checked, pre-restore ``None``
``merge_state``           destination, before ``Machine.restore`` the document as is
``before_commit``         source, key release sent, before PREPARED nothing
``commit_token``          COMMIT's body                           ``b""``
``undo_commit``           source, any failure before COMMIT went   nothing
``check_commit``          destination, on COMMIT                  nothing
``resumed(machine)``      destination, after it resumed           nothing
``discarded()``           destination, the session failed         nothing
=======================  ======================================  =====================

``SecureMode`` implements them with the modules of this package; each
``--insecure DEFENCE`` turns exactly one defence off (``INSECURE``).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import wait
from pathlib import Path

from migrate.errors import MigrationError, ProtocolError, Refused
from migrate.jsonscan import Limits, ScanError, loads_bounded
from migrate.messages import STATUS_NAMES, STATUS_OK, Welcome, decode_reason
from migrate.secure import commit, generation, keyrelease, rollback
from migrate.secure.attest import Attestor, same_state
from migrate.secure.channel import SealedChannel
from migrate.secure.errors import AttestationFailed, KeyReleaseRefused, SecurityError, StaleGeneration
from migrate.secure.keyschedule import Ephemeral, KeyShare, derive, transcript_hash
from migrate.secure.workers import background
from migrate.wire import Channel, RecordType

INSECURE = ("attestation", "encryption", "toctou", "replay", "ordering")
MAX_SECRET = 8 << 20
# The protection section nests six deep (protection.processes[i].pages[j]);
# a page entry is one list of ~110 bytes.
SECRET_LIMITS = Limits(max_depth=8, max_containers=MAX_SECRET // 64, max_values=MAX_SECRET // 4,
                       max_strings=MAX_SECRET // 16)


def _named(future, what: str):
    """``future.result()``; a failure that is not already a MigrationError
    (an OSError of this host's TPM or disk) becomes a SecurityError naming ``what``."""
    try:
        return future.result()
    except MigrationError:
        raise
    except Exception as exc:                    # noqa: BLE001 - named, and fails closed
        raise SecurityError(f"{what}: {type(exc).__name__}: {exc}; the migration stops here") from exc


def _settle(*futures) -> None:
    """Wait until each of ``futures`` (None: none), in order, has ended,
    whatever its outcome: clean-up after a failure already being reported."""
    for future in futures:
        if future is not None:
            try:
                future.result()
            except Exception:                   # noqa: BLE001 - that failure is not news
                pass


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class PlainMode:
    """Today's engine, unchanged: no attestation, no encryption."""
    name = "plain"
    insecure: frozenset = frozenset()

    def __init__(self):
        self.phases: dict[str, float] = {}

    def channel(self, sock, *, timeout: float, role: str):
        return Channel(sock, timeout=timeout)

    def hello_info(self, machine) -> dict:
        return {}

    def source_handshake(self, ch, hello_body: bytes) -> None:
        pass

    def destination_handshake(self, ch, hello, hello_body: bytes) -> None:
        pass

    def round_begins(self, ch) -> None:
        pass

    def round_acked(self, ch) -> None:
        pass

    def round_ended(self, ch) -> None:
        pass

    def before_pause(self):
        """Work that must end before the guest pauses, already running (a
        future: the source runs the guest's slices until it is done), or None."""
        return None

    def at_pause(self, machine, peer: str) -> None:
        pass

    def take(self, ch, rec) -> bool:
        return False

    def split_state(self, doc: dict):
        return doc, None

    def source_final(self, ch, secret) -> None:
        pass

    def destination_final(self, ch):
        return None

    def merge_state(self, doc: dict, secret) -> dict:
        return doc

    def before_commit(self, machine, peer: str) -> None:
        pass

    def commit_token(self) -> bytes:
        return b""

    def undo_commit(self, machine) -> None:
        pass

    def check_commit(self, body: bytes) -> None:
        pass

    def resumed(self, machine) -> None:
        pass

    def discarded(self) -> None:
        """Destination: the session failed; finish what it left running."""

    def save_recovery(self, machine, path) -> str | None:
        """After an unconfirmed commit: None (the caller saves a plain state file)."""
        return None

    def describe(self) -> str:
        return "plain mode (no attestation, no encryption)"


class SecureMode(PlainMode):
    """The secure protocol.  One object per migration session (it holds the keys)."""
    name = "secure"

    def __init__(self, attestor: Attestor, *, insecure=(), state_dir: Path | str | None = None):
        super().__init__()
        bad = set(insecure) - set(INSECURE)
        if bad:
            raise ValueError(f"unknown defence(s) {sorted(bad)}; known: {', '.join(INSECURE)}")
        self.attestor = attestor
        self.insecure = frozenset(insecure)
        self.state_dir = Path(state_dir) if state_dir else attestor.tpm_dir
        self.keys = None
        self.peer = None            # AttestationResult of the handshake
        self.vm = None              # (vm_id, generation)
        self._machine = None        # the source machine whose generation this session spends
        self._escrow = None
        self._mark = None
        self._release = None        # destination: its release key (made at the handshake)
        self._final_quote = None    # destination: the latest final quote (a future), made during a round
        self._quote_asked = False   # destination: a FRESH_NONCE not answered yet
        self._quote_sent = False    # destination: a FINAL_QUOTE went out
        self._nonce = None          # source: the fresh nonce of the current pre-copy round
        self._release_public = None  # source: R, as the final quotes name it
        self._verified = None       # source: R, from the last round's final quote, verified
        self._verifying = None      # source: that verification while it runs (a future)
        self._committing = None     # source: keys escrowed and mark written, from the pause on
        self._marking = None        # source: the pending mark, made durable beside pre-copy
        self._accepting = None      # destination: the generation, advanced beside pre-copy
        self._remember = None       # source: its TPM recording the spent generation

    def on(self, defence: str) -> bool:
        return defence not in self.insecure

    def describe(self) -> str:
        off = ", ".join(sorted(self.insecure))
        return "secure mode" + (f" WITH DEFENCES OFF: {off} (insecure, for teaching)" if off else "")

    def _time(self, phase: str, t0: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    # ---------------------------------------------------------------- channel
    def channel(self, sock, *, timeout: float, role: str):
        return SealedChannel(sock, timeout=timeout, role=role, encryption=self.on("encryption"),
                             replay=self.on("replay"))

    def hello_info(self, machine) -> dict:
        vm_id, gen = machine.migration_identity
        if self.on("replay"):       # an old copy of a VM that left this host does not leave again
            rollback.check_restore(machine, self.state_dir, "this VM", tpm=self.attestor.tpm)
        self.vm = (vm_id, gen + 1)
        # The generation is spent (kept on the machine) only once both ends have
        # attested (end of source_handshake): the destination records it right
        # after, so a retry after a later failure is newer.  Spending it at
        # HELLO let a man in the middle who cuts connections before attestation
        # burn generations until the destination refused the VM's jump for good
        # (hostile review).
        self._machine = machine
        return {"mode": "secure", "vm_id": vm_id, "generation": gen + 1}

    # -------------------------------------------------------------- handshake
    def source_handshake(self, ch, hello_body: bytes) -> None:
        t0 = time.perf_counter()
        eph = Ephemeral()
        ch.send(RecordType.KEY_SHARE, eph.share.encode())
        rec = ch.recv()
        if rec.type is RecordType.WELCOME:
            w = Welcome.decode(rec.body)
            if w.status != STATUS_OK:
                raise Refused(f"destination refused the migration ({STATUS_NAMES[w.status]}): {w.reason}")
            raise SecurityError("the destination answered in plain mode: refusing to send the VM "
                                "without attestation and encryption (run both ends with --plain to do that)")
        if rec.type is RecordType.ABORT:
            raise SecurityError(f"destination aborted the handshake: {decode_reason(rec.body)}")
        if rec.type is not RecordType.KEY_SHARE:
            raise ProtocolError(f"expected KEY_SHARE, destination sent {rec.type.name}")
        peer_share = KeyShare.decode(rec.body)
        th = transcript_hash(hello_body, eph.share.encode(), peer_share.encode())
        self.keys = derive(eph.exchange(peer_share.public), th)
        # Our quote is made while the destination's is on its way (at once: it is
        # what we wait for next).
        own = background(lambda: self.attestor.quote(peer_share.nonce, th), now=True)
        try:
            rec = ch.recv(only=frozenset({RecordType.QUOTE, RecordType.ABORT}))
            if rec.type is RecordType.ABORT:
                raise SecurityError(f"destination aborted the handshake: {decode_reason(rec.body)}")
            # Ours goes out before we verify theirs, so that both ends verify at
            # once (a verification is the handshake's longest step).  It gives the
            # peer nothing: a quote holds measurements, which are public, and is
            # bound to this session's transcript, so it proves nothing elsewhere;
            # nothing of the VM crosses before both verifications passed.
            ch.send(RecordType.QUOTE, own.result())
            if self.on("attestation"):
                self.peer = self.attestor.verify(rec.body, eph.share.nonce, th, who="destination")
        finally:
            wait((own,))                    # never leave our quote running into the next TPM user
        self._machine.migration_identity = self.vm      # both attested: the generation is spent
        if self.on("replay"):
            # ... and this host's TPM remembers it: a state of the VM saved before
            # now (an older generation) is never resumed here again (rollback.py).
            # A TPM NV write costs ~25 ms here: it runs beside pre-copy and is
            # joined before this session touches the TPM again or commits.
            self._remember = background(lambda: generation.accept(self.attestor.tpm, *self.vm))
        if self.on("ordering"):
            # The durable migrated-away mark (two fsyncs) exists before the guest
            # pauses: made beside pre-copy, waited for before the pause.  (Started
            # here, after attestation, not beside it: its thread took the
            # interpreter from the handshake, ~2 ms, measured.)
            self._mark = commit.MigrationMark(self.state_dir, self.vm[0], self.vm[1])
            self._marking = background(self._mark.prepare)
        ch.seal(self.keys)                  # WELCOME and everything after: sealed
        self._time("attestation", t0)

    def destination_handshake(self, ch, hello, hello_body: bytes) -> None:
        t0 = time.perf_counter()
        if hello.info.get("mode") != "secure":
            raise SecurityError("the source speaks plain mode; this destination accepts only the "
                                "secure protocol (run both ends with --plain to allow it)")
        vm_id, gen = generation.parse(hello.info)
        rec = ch.recv(only=frozenset({RecordType.KEY_SHARE}))
        peer_share = KeyShare.decode(rec.body)
        eph = Ephemeral()
        ch.send(RecordType.KEY_SHARE, eph.share.encode())
        th = transcript_hash(hello_body, peer_share.encode(), eph.share.encode())
        self.keys = derive(eph.exchange(peer_share.public), th)
        ch.send(RecordType.QUOTE, self.attestor.quote(peer_share.nonce, th))
        # While the source verifies that quote and sends its own (the handshake's
        # critical path), this TPM does the rest of its handshake work on a
        # worker, so that the source's quote is verified the moment it arrives
        # (done here first, it held that verification back 0.5-1.5 ms, traced).
        tpm_work = background(lambda: self._release_and_check(vm_id, gen), now=True)
        try:
            rec = ch.recv(only=frozenset({RecordType.QUOTE}))
            ch.seal(self.keys)              # our ABORT, if any, is sealed too
            if self.on("attestation"):
                self.peer = self.attestor.verify(rec.body, eph.share.nonce, th, who="source")
        finally:
            wait((tpm_work,))               # never leave it running into the next TPM user
        stale = _named(tpm_work, "this host's TPM could not make the release key or read the VM's generation")
        if stale is not None:
            raise stale
        if self.on("replay"):
            # Advanced durably (NV writes, fsyncs: ~5-20 ms) beside the pre-copy rounds;
            # waited for before PREPARED, so the VM never resumes here without it.
            self._accepting = self._advance_generation(vm_id, gen)
        self.vm = (vm_id, gen)
        self._time("attestation", t0)

    def _release_and_check(self, vm_id: str, gen: int):
        """Destination, beside the handshake: the release key, sealed now to the
        PCR values just quoted (it opens at key release only if PCRs 8-10 never
        changed since: they only ever extend); and the generation check (an NV
        read), returned, not raised: its verdict waits until the source is
        attested, so a replayed stream is refused for its stale quote first."""
        self._release = keyrelease.ReleaseKey(self.attestor.tpm, seal=self.on("toctou"))
        if self.on("replay"):
            try:
                generation.check(self.attestor.tpm, vm_id, gen)
            except StaleGeneration as exc:
                return exc
        return None

    def _advance_generation(self, vm_id: str, gen: int):
        """Destination: the VM's generation written to this TPM's NV counter, on a
        worker (its future).  Joined before the first FINAL_QUOTE, before PREPARED,
        and when the session fails (``discarded``)."""
        return background(lambda: generation.accept(self.attestor.tpm, vm_id, gen))

    # ------------------------------------------------------------ final phase
    def split_state(self, doc: dict):
        """Public part (sent as STATE, digested) and secret part (process keys and
        protection metadata: sent only wrapped in KEY_RELEASE)."""
        public = dict(doc)
        secret = {"protection": public.pop("protection", None)}
        public["protection"] = None
        return public, _canonical(secret)

    # The final (TOCTOU) quote is taken in every pre-copy round, while the guest
    # still runs: FRESH_NONCE before the round's pages, FINAL_QUOTE right after its
    # ROUND_ACK, verified by the source on its sender thread.  The last one before
    # the pause is the one that counts.  Why that is enough (docs/protocol.md, "Key
    # release"): the keys are wrapped to R, whose private half the destination's TPM
    # unseals only while PCRs 8-10 hold the values they had at the handshake, so a
    # change at any time between that quote and the use of the keys still gets
    # nothing; the quote binds R to this session (th || R) and refuses, by name and
    # before anything secret leaves, a destination that already changed.  So a TPM
    # quote, its round trip and its verification are out of the downtime.
    def round_begins(self, ch) -> None:
        t0 = time.perf_counter()
        self._nonce = keyrelease.fresh_nonce()
        ch.send(RecordType.FRESH_NONCE, self._nonce)
        self._time("key_release", t0)

    def take(self, ch, rec) -> bool:
        if rec.type is not RecordType.FRESH_NONCE:
            return False
        if self._quote_asked or len(rec.body) != 32:
            raise ProtocolError("FRESH_NONCE repeated before its FINAL_QUOTE, or of the wrong size")
        nonce, binding = bytes(rec.body), keyrelease.binding(self.keys.transcript, self._release.public)
        self._final_quote = background(lambda: self.attestor.quote(nonce, binding))
        self._quote_asked = True
        return True

    def round_ended(self, ch) -> None:
        if not self._quote_asked:
            return
        t0 = time.perf_counter()
        quote = self._final_quote.result()
        if self._accepting is not None:
            # The generation's NV writes (fsyncs) end before the first final quote
            # goes: the source waits for it with its guest running, and so they
            # are never left for the pause (destination_final waits for them).
            self._accepting.result()
        ch.send(RecordType.FINAL_QUOTE, self._release.public, quote)
        self._quote_asked, self._quote_sent = False, True
        self._time("key_release", t0)

    def round_acked(self, ch) -> None:
        t0 = time.perf_counter()
        rec = ch.recv(only=frozenset({RecordType.FINAL_QUOTE, RecordType.ABORT}))
        if rec.type is RecordType.ABORT:
            raise SecurityError(f"destination aborted before key release: {decode_reason(rec.body)}")
        if len(rec.body) < keyrelease.PUB:
            raise ProtocolError("FINAL_QUOTE too short")
        r_pub, evidence = bytes(rec.body[:keyrelease.PUB]), bytes(rec.body[keyrelease.PUB:])
        if self._release_public is not None and r_pub != self._release_public:
            raise KeyReleaseRefused("no process key released: the destination's release key changed "
                                    "between two final quotes")
        self._release_public = r_pub
        # Verified on a thread while the next round is sent, or, after the last
        # round, while the guest still runs before the pause (before_pause): never
        # inside the downtime, and no round waits for it.  A failure surfaces at
        # the next round's quote or before the pause, before anything secret left.
        self._verification()                # the previous round's first (its failure stops us here)
        self._verified = None               # only the newest quote's verification counts
        nonce = self._nonce
        self._verifying = background(lambda: self._check_final(evidence, nonce, r_pub))
        self._time("key_release", t0)

    def _verification(self) -> None:
        """Wait for the running verification of a final quote; raise its failure."""
        if self._verifying is not None:
            done, self._verifying = self._verifying, None
            self._verified = done.result()

    def before_pause(self):
        """While the guest still runs: the last final quote's verification, this
        host's TPM recording the spent generation (NV writes: four fsyncs, 10-60 ms
        here) and the pending migrated-away mark.  Left to the pause, a slow disk
        would lengthen the downtime; here it only lengthens pre-copy."""
        if self._verifying is None and all(f is None or f.done() for f in (self._remember, self._marking)):
            return None

        def finish():
            self._verification()
            self._remembered()
            self._marked()
        # On a worker, not a thread started now: a thread start waits for the
        # GIL, which the guest's thread holds between its slices (workers.py).
        return background(finish, now=True)

    def _check_final(self, evidence: bytes, nonce: bytes, r_pub: bytes) -> bytes:
        t0 = time.perf_counter()
        try:
            return self._check_final_quote(evidence, nonce, r_pub)
        finally:
            self._time("key_release", t0)

    def _check_final_quote(self, evidence: bytes, nonce: bytes, r_pub: bytes) -> bytes:
        if self.on("toctou") and self.peer is not None:     # (--insecure attestation: no peer to compare)
            try:
                final = self.attestor.verify(evidence, nonce, keyrelease.binding(self.keys.transcript, r_pub),
                                             who="destination (final quote)")
            except AttestationFailed as exc:
                raise KeyReleaseRefused(f"no process key released: {exc}") from None
            diff = same_state(self.peer, final)
            if diff:
                raise KeyReleaseRefused(f"no process key released: the destination's {diff} "
                                        f"(time-of-check/time-of-use)")
        return r_pub

    def at_pause(self, machine, peer: str) -> None:
        """The guest is paused, so its process keys no longer change: seal them to
        our own TPM and write the migrated-away mark (an fdatasync) now, beside the
        final round, rather than after the key release inside the downtime."""
        if self.on("ordering"):
            def prepare():
                self._remembered()      # one TPM user at a time: the generation's NV write first
                self._marked()
                escrow = commit.escrow_keys(machine, self.attestor.tpm)
                self._mark.commit(self.vm[1], peer, escrow)
                return escrow
            self._committing = background(prepare)

    def source_final(self, ch, secret: bytes) -> None:
        t0 = time.perf_counter()
        self._verification()        # (already done before the pause: Source calls before_pause)
        if self._verified is None:
            raise ProtocolError("no verified final quote from the last pre-copy round")
        ch.send(RecordType.KEY_RELEASE, keyrelease.wrap(secret, self._verified, self.keys))
        self._time("key_release", t0)

    def destination_final(self, ch):
        t0 = time.perf_counter()
        if not self._quote_sent or self._quote_asked:
            raise ProtocolError("the source asked for no final quote (FRESH_NONCE) in a pre-copy round, "
                                "or did not wait for it")
        rec = ch.recv(only=frozenset({RecordType.KEY_RELEASE}))
        secret = self._release.open(rec.body, self.keys)
        if self._accepting is not None:
            self._accepting.result()        # the generation is durable before PREPARED
        self._time("key_release", t0)
        return secret

    def merge_state(self, doc: dict, secret) -> dict:
        if len(secret) > MAX_SECRET:
            raise ProtocolError("secret part of the state too large")
        try:       # bounded like the public part: no deep nesting, no swarm of empty lists
            part = loads_bounded(secret, SECRET_LIMITS)
        except ScanError as exc:
            raise ProtocolError(f"secret part of the state: {exc}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"secret part of the state: not JSON ({exc})") from None
        if not isinstance(part, dict) or set(part) != {"protection"}:
            raise ProtocolError("secret part of the state must hold exactly 'protection'")
        if doc.get("protection") is not None:
            raise ProtocolError("public part of the state carries protection state (it must not)")
        ident = doc.get("identity")
        if not isinstance(ident, dict) or (ident.get("vm_id"), ident.get("generation")) != self.vm:
            raise ProtocolError("the state's VM identity and generation are not the ones HELLO announced")
        return {**doc, "protection": part["protection"]}

    # ----------------------------------------------------------------- commit
    def _remembered(self) -> None:
        """Wait for the TPM to record the spent generation (fail closed if it could not).
        A failure of this host's own TPM or disk is a refusal like any other: a
        named MigrationError that stops the migration before COMMIT (the guest
        runs on here), never a raw OSError that ends the VMM and its only copy
        of the guest with it (test_secure_pipeline_attacks)."""
        if self._remember is not None:
            done, self._remember = self._remember, None
            _named(done, "this host's TPM could not record the VM's spent generation")

    def _marked(self) -> None:
        """Wait for the pending migrated-away mark to be durable (fail closed as above)."""
        if self._marking is not None:
            _named(self._marking, "the migrated-away mark could not be made durable")

    def before_commit(self, machine, peer: str) -> None:
        t0 = time.perf_counter()
        self._remembered()
        if self.on("ordering"):
            self._escrow = _named(self._committing,     # escrowed and marked since the pause
                                  "the process keys could not be sealed to this host's TPM and marked")
            self._committing = None
            commit.destroy_keys(machine)
        self._time("commit", t0)

    def commit_token(self) -> bytes:
        return commit.commit_token(self.keys)

    def undo_commit(self, machine) -> None:
        # Undoing: the keys come back and the mark is undone whatever these jobs
        # did, but only once they ended (one TPM user at a time; a mark is undone
        # after it was written).  A failure between the pause and before_commit:
        # the keys were never destroyed, the escrow and mark finish, then the mark
        # is undone.
        _settle(self._remember, self._committing, self._marking)
        self._remember = self._committing = None
        if self._escrow is not None:
            commit.restore_keys(machine, self.attestor.tpm, self._escrow)
            self._escrow = None
        if self._mark is not None:
            try:
                self._mark.undo()
            except OSError:     # a disk that failed the mark fails its undo too: the keys are back
                self._mark.close()      # and the guest runs; the mark stays "pending" (rollback.py)
            self._mark = None

    def save_recovery(self, machine, path) -> str | None:
        """The paused VM with its process keys, sealed to this host's TPM."""
        if self._escrow is None:
            return None
        path = commit.seal_recovery(machine, self.attestor.tpm, self._escrow, path)
        return (f"the paused guest and its process keys are sealed to this host's TPM in {path}; ONLY if "
                f"the destination did not resume it, continue it with: minivmm recover {path}")

    def check_commit(self, body: bytes) -> None:
        if self.on("ordering"):
            commit.check_commit(self.keys, body)

    def resumed(self, machine) -> None:
        machine.migration_identity = self.vm

    def discarded(self) -> None:
        """The VM's generation, once accepted here, is durable before this session
        ends, even a failed one: the destination takes its next session only then,
        so a copy of the VM announcing the same generation cannot pass the check
        while the write is still on its way (test_secure_pipeline_attacks)."""
        _settle(self._accepting)           # (the session failed already: its outcome is no news)
