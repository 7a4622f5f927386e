"""Attacks on the secure protocol's timing changes (issue 13, sixth session):

* the final quote of each pre-copy round is verified on a thread beside the
  next round, and only the newest verification counts for key release;
* the source sends its own handshake quote before it verifies the destination's;
* the destination's NV write and the source's are off the critical path.

Each attack runs a real source against a hostile destination (a ``SecureMode``
subclass on the real destination engine: it has the session keys, as a rogue
host running the protocol would) in one process over loopback TCP, with real
TPM state on disk.  No test depends on timing: pre-copy runs in lockstep
(``round_ticks``) and three rounds always run (a downtime target nothing meets),
so "round k's quote good, round k+1's bad" is the same run on any machine."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from migrate.errors import MigrationError, ProtocolError
from migrate.precopy import PrecopyPolicy
from migrate.secure import keyrelease
from migrate.secure.attest import Attestor
from migrate.secure.channel import SealedChannel
from migrate.secure.errors import AttestationFailed, KeyReleaseRefused, SecurityError, StaleGeneration
from migrate.secure.mode import SecureMode
from migrate.server import Server
from migrate.source import MIGRATED, Source
from migrate.wire import HEADER, PAGE_SIZE, RecordType
from tpm import EventType, Issuer, SoftTpm

from mitm import Mitm
from securehelp import Trust, secure_receive_in_thread
from test_secure_attacks import assert_home_intact, guest

# Three pre-copy rounds, always: lockstep (the guest runs 3 ticks between rounds,
# dirtying its stack and the keeper's pages) and a downtime target no dirty set
# meets, so the policy stops at the round bound.  So a destination sees exactly
# three FRESH_NONCEs and sends three FINAL_QUOTEs, on any machine.
ROUNDS = 3
THREE_ROUNDS = PrecopyPolicy(round_ticks=3, max_rounds=ROUNDS, downtime_target=1e-9)


def _recorder(port):
    return Mitm(port)


def migrate(src_mode, dst_factory, m=None, insecure=(), policy=THREE_ROUNDS, via=_recorder):
    """Migrate ``m`` from a source with ``src_mode`` to a destination made by
    ``dst_factory``, through ``via(port) -> Mitm`` (a recorder) unless None."""
    m = m or guest()
    server = Server("127.0.0.1:0", timeout=5, channel=lambda sock, timeout: SealedChannel(
        sock, timeout=timeout, role="destination", encryption="encryption" not in insecure,
        replay="replay" not in insecure))
    res = {}
    t = secure_receive_in_thread(server, res, dst_factory, timeout=5)
    target = server.label
    relay = None
    if via is not None:
        relay = via(server.address[1])
        target = f"127.0.0.1:{relay.port}"
    try:
        res["report"] = Source(m, mode=src_mode, timeout=5, policy=policy).migrate(target)
    except MigrationError as exc:
        res["source_error"] = exc
    t.join(60)
    server.close()
    if relay is not None:
        relay.done.wait(30)
        relay.close()
        res["relay"] = relay
    return m, res


class Watched(SecureMode):
    """The honest source, noting each final quote's verification as it ends
    ("ok" or the error's class name): the attacks below must be refused by the
    verification of the quote they meant, not by accident."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.verdicts = []

    def _check_final(self, evidence, nonce, r_pub):
        try:
            out = super()._check_final(evidence, nonce, r_pub)
        except Exception as exc:
            self.verdicts.append(type(exc).__name__)
            raise
        self.verdicts.append("ok")
        return out


class Hostile(SecureMode):
    """A destination running the protocol, with hooks: ``before_quote(k)`` runs
    when round k's FRESH_NONCE arrives (before its quote is made), and
    ``quote_for(k, genuine)`` chooses the FINAL_QUOTE evidence round k sends."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.asked = 0          # FRESH_NONCEs taken
        self.sent = []          # the evidence of each FINAL_QUOTE sent

    def before_quote(self, k):
        pass

    def quote_for(self, k, genuine):
        return genuine

    def take(self, ch, rec):
        if rec.type is RecordType.FRESH_NONCE:
            self.before_quote(self.asked)
            self.asked += 1
        return super().take(ch, rec)

    def round_ended(self, ch):
        if not self._quote_asked:
            return
        k = len(self.sent)
        evidence = self.quote_for(k, self._final_quote.result())
        self._final_quote = _done(evidence)
        self.sent.append(evidence)
        super().round_ended(ch)


def _done(value):
    from concurrent.futures import Future
    f = Future()
    f.set_result(value)
    return f


def _reconfigure(tpm, what=b"reconfigured after attestation"):
    tpm.extend(9, hashlib.sha256(what).digest(), event_type=EventType.MANUAL, data=what)


def _pcrs(tpm_dir):
    tpm = SoftTpm.open(tpm_dir, startup=None, create=False)
    return [tpm.read_pcr(i) for i in (8, 9, 10)]


def refused_at_home(m, keys, res, err_type, *words):
    """No process key and no metadata went out; the source names the failure
    and runs its guest with its keys; the destination resumed nothing."""
    err = res.get("source_error")
    assert isinstance(err, err_type), res
    for w in words:
        assert w in str(err), str(err)
    assert "report" not in res
    assert "incoming" not in res and "error" in res      # the destination discarded (one copy)
    if "relay" in res:          # nothing secret crossed: no KEY_RELEASE (nor COMMIT) was sent
        sent = [t for t, _ in res["relay"].seen]
        assert RecordType.KEY_RELEASE not in sent and RecordType.COMMIT not in sent, sent
        assert RecordType.STATE not in sent, "no part of the state document crossed"
    assert_home_intact(m, keys, res)


# ------------------------------------------------ 1. pipelined final quotes
class ChangesInRound(Hostile):
    """Round 0's quote is genuine and the host unchanged; before round ``at``'s
    quote the host's measured state changes (PCR 9 extended: the VMM
    reconfigured), so that quote is genuine but shows the change."""
    at = 1

    def before_quote(self, k):
        if k == self.at:
            _reconfigure(self.attestor.tpm)


@pytest.mark.parametrize("at", [1, ROUNDS - 1])
def test_a_later_final_quote_showing_a_change_releases_nothing(tmp_path, at):
    """Round 0's quote verifies; a later round's shows PCR 9 changed.  Only the
    newest verification counts: nothing is released, the source resumes.
    (at = 2: the last pre-copy round, verified beside the guest before the pause.)"""
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    hostile = type("H", (ChangesInRound,), {"at": at})
    m, res = migrate(src, lambda: hostile(attestor_b))
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released",
                    "PCR 9 changed since attestation", "time-of-check/time-of-use")
    # round k's verification is joined when round k+1's quote arrives, or before the
    # pause: the guest never paused (no stop-and-copy round began)
    assert len(res["mode"].sent) == min(at + 2, ROUNDS)
    assert [t for t, _ in res["relay"].seen].count(RecordType.ROUND_BEGIN) == min(at + 2, ROUNDS)
    assert src.verdicts == ["ok"] * at + ["KeyReleaseRefused"]


@pytest.mark.parametrize("attack", ["change", "reset"])
def test_with_toctou_off_a_later_changed_final_quote_gets_the_keys(tmp_path, attack):
    """The same attacks (a PCR changed in round 1; a TPM reset and measured
    again before round 1's quote) with --insecure toctou on both ends: the keys
    go out and the changed destination runs the protected process to its end."""
    trust = Trust(tmp_path, configurations=({"insecure": ("toctou",)},))
    a = trust.host("a", insecure=("toctou",))
    b = trust.host("b", insecure=("toctou",), role="destination")
    attestor_b = trust.mode(b).attestor
    hostile = ChangesInRound if attack == "change" else \
        type("R", (ResetInRound,), {"remeasure": (trust, "b", ("toctou",))})
    m, res = migrate(trust.mode(a, insecure=("toctou",)),
                     lambda: hostile(attestor_b, insecure=("toctou",)))
    assert res["report"].outcome == "completed", res
    d = res["incoming"].machine
    assert m.halted == MIGRATED and d.exits == {1: 0, 2: 0}
    assert d.console.text(1).count("secret intact") == 30


class ReplaysRoundZero(Hostile):
    """Sends round 0's (genuine, verified) quote again from round ``at`` on: a
    quote made before its PCRs changed, answered for later rounds' nonces."""
    at = 1

    def before_quote(self, k):
        if k == self.at:
            _reconfigure(self.attestor.tpm)

    def quote_for(self, k, genuine):
        return self.sent[0] if k >= self.at else genuine


def test_a_final_quote_replayed_from_an_earlier_round_releases_nothing(tmp_path):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    m, res = migrate(src, lambda: ReplaysRoundZero(attestor_b))
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released",
                    "stale nonce or quote bound to another session")
    assert res["mode"].sent[1] == res["mode"].sent[0]
    assert src.verdicts == ["ok", "KeyReleaseRefused"]


class BadThenGood(Hostile):
    """Round 0's quote is bad (over a nonce of its own choosing, cut short, or
    garbage); every later quote is genuine and good.  A source that let a
    newer verification replace an older, failed one would release."""
    bad = "nonce"

    def quote_for(self, k, genuine):
        if k:
            return genuine
        if self.bad == "cut":
            return genuine[:-1]
        if self.bad == "garbage":
            return bytes(range(256)) * 8
        binding = keyrelease.binding(self.keys.transcript, self._release.public)
        return self.attestor.quote(bytes(32), binding)


@pytest.mark.parametrize("bad,why", [("nonce", "stale nonce or quote bound to another session"),
                                     ("cut", "malformed evidence"), ("garbage", "malformed evidence")])
def test_an_older_failed_final_quote_is_not_forgotten_for_a_newer_good_one(tmp_path, bad, why):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    hostile = type("B", (BadThenGood,), {"bad": bad})
    m, res = migrate(src, lambda: hostile(attestor_b))
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released", why)
    # refused when round 1's quote arrived (round 0's verification joined then),
    # whatever round 1's own verification said
    assert src.verdicts[0] == "KeyReleaseRefused" and len(res["mode"].sent) == 2


class ResetInRound(Hostile):
    """Hostile TPM state: the host's TPM is reset (a reboot, or another VMM
    started on it) before round ``at``'s quote and measured again with exactly
    the attested VMM, so PCRs 8-10 hold the attested values again and the AK is
    the same: only the TPM's resetCount (restartCount, for a resume) shows that
    the PCRs were cleared, and whatever ran in between was never quoted."""
    at = 1
    remeasure = None            # (Trust, host name[, defences off]), set by the test

    def before_quote(self, k):
        if k == self.at:
            trust, name, *off = self.remeasure
            # In between: something unapproved is measured (and runs) ...
            _reconfigure(self.attestor.tpm, b"an unapproved VMM ran here")
            # ... then: reset, the approved VMM again
            trust.host(name, role="destination", insecure=tuple(off[0]) if off else ())


class ResumedInRound(Hostile):
    """... or resumed (hibernated and woken: PCRs kept, restartCount + 1)."""
    def before_quote(self, k):
        if k == 1:
            self.attestor.tpm.resume()


@pytest.mark.parametrize("how", ["reset", "resume"])
def test_a_tpm_reset_or_resume_between_the_quotes_releases_nothing(tmp_path, how):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    before = _pcrs(b)
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    if how == "reset":
        hostile = type("R", (ResetInRound,), {"remeasure": (trust, "b")})
        word = "TPM Reset between the quotes"
    else:
        hostile, word = ResumedInRound, "TPM Restart or Resume between the quotes"
    m, res = migrate(src, lambda: hostile(attestor_b))
    assert _pcrs(b) == before, "the attack restores the attested PCR values"
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released", word)
    assert src.verdicts == ["ok", "KeyReleaseRefused"]


class ResetAfterItsLastQuote(SecureMode):
    """The same after the last final quote, before KEY_RELEASE is opened: the
    source saw nothing (its last quote was genuine and unchanged); the PCR
    policy of the sealed release key holds again after the re-measure."""
    remeasure = None

    def destination_final(self, ch):
        self._final_quote.result()
        trust, name = self.remeasure
        _reconfigure(self.attestor.tpm, b"an unapproved VMM ran here")
        trust.host(name, role="destination")
        return super().destination_final(ch)


def test_a_tpm_reset_after_the_last_final_quote_opens_no_key(tmp_path):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    before = _pcrs(b)
    m = guest()
    keys = dict(m.protection._keys)
    attestor_b = trust.mode(b).attestor
    hostile = type("R", (ResetAfterItsLastQuote,), {"remeasure": (trust, "b")})
    m, res = migrate(trust.mode(a), lambda: hostile(attestor_b))
    assert _pcrs(b) == before
    assert isinstance(res["error"], KeyReleaseRefused), res
    assert "refuses to open the release key: the TPM was reset or restarted" in str(res["error"])
    assert "the TPM was reset or restarted" in str(res["source_error"])     # told (sealed ABORT)
    assert "incoming" not in res and "report" not in res
    assert_home_intact(m, keys, res)


@pytest.mark.parametrize("how", ["reset", "resume"])
def test_the_release_key_opens_only_in_the_boot_it_was_sealed_in(tmp_path, how):
    """The release key's PCR policy holds again after a reset and the same
    measured start (or a resume): the boot it was sealed in must hold too."""
    from test_secure_attacks import _kat_keys
    trust = Trust(tmp_path)
    b = trust.host("b", role="destination")
    tpm = SoftTpm.open(b, startup=None)
    keys = _kat_keys()
    release = keyrelease.ReleaseKey(tpm)
    body = keyrelease.wrap(b"process keys", release.public, keys)
    assert release.open(body, keys) == b"process keys"
    before = _pcrs(b)
    if how == "reset":
        trust.host("b", role="destination")
    else:
        tpm.resume()
    assert _pcrs(b) == before
    with pytest.raises(KeyReleaseRefused, match="the TPM was reset or restarted"):
        release.open(body, keys)
    loose = keyrelease.ReleaseKey(tpm, seal=False)      # --insecure toctou: no such check
    assert loose.open(keyrelease.wrap(b"k", loose.public, keys), keys) == b"k"


class AnotherTpmAnswers(Hostile):
    """The attested host changes (PCR 9); its final quotes come from a second,
    clean TPM (same issuer, same approved measurements, another AK), which
    also holds the release key.  Set ``other`` to that TPM's directory."""
    other = None

    def destination_handshake(self, ch, hello, hello_body):
        super().destination_handshake(ch, hello, hello_body)
        self._clean = Attestor(self.other, self.attestor.issuer_path, self.attestor.policy_path)
        self._release = keyrelease.ReleaseKey(self._clean.tpm)
        _reconfigure(self.attestor.tpm)

    def quote_for(self, k, genuine):
        binding = keyrelease.binding(self.keys.transcript, self._release.public)
        return self._clean.quote(self._nonces[k], binding)

    def take(self, ch, rec):
        if rec.type is RecordType.FRESH_NONCE:
            self._nonces = getattr(self, "_nonces", []) + [bytes(rec.body)]
        return super().take(ch, rec)


def test_a_final_quote_from_another_tpm_releases_nothing(tmp_path):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    clean = trust.host("b-clean", role="destination")
    assert _pcrs(clean) == _pcrs(b), "the second TPM is in the attested state"
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    hostile = type("A", (AnotherTpmAnswers,), {"other": clean})
    m, res = migrate(src, lambda: hostile(attestor_b))
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released",
                    "a different TPM answered the final quote")
    assert src.verdicts == ["KeyReleaseRefused"]


class NewReleaseKeyInRound(Hostile):
    """Round 1's FINAL_QUOTE names a new release key R' (made now, after the
    handshake's seal; a genuine quote bound to R'): the keys would be wrapped
    to a key that was not sealed when the handshake's PCRs were quoted."""
    def quote_for(self, k, genuine):
        if k == 1:
            self._release = keyrelease.ReleaseKey(self.attestor.tpm, seal=False)
            binding = keyrelease.binding(self.keys.transcript, self._release.public)
            return self.attestor.quote(self._nonces[1], binding)
        return genuine

    def take(self, ch, rec):
        if rec.type is RecordType.FRESH_NONCE:
            self._nonces = getattr(self, "_nonces", []) + [bytes(rec.body)]
        return super().take(ch, rec)


def test_a_release_key_changed_between_final_quotes_releases_nothing(tmp_path):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    src = Watched(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    m, res = migrate(src, lambda: NewReleaseKeyInRound(attestor_b))
    refused_at_home(m, keys, res, KeyReleaseRefused, "no process key released",
                    "release key changed between two final quotes")
    assert src.verdicts == ["ok"]       # refused as round 1's quote arrived, before verifying it


# --------------------------------- 3. other orders: duplicated or early quotes
class DuplicateFinalQuote(Hostile):
    """Sends round ``at``'s FINAL_QUOTE twice: the second arrives where the
    source waits for the next round's ROUND_ACK (the final round's, for the
    last pre-copy round: inside the pause, before KEY_RELEASE)."""
    at = 0

    def round_ended(self, ch):
        k = len(self.sent)
        super().round_ended(ch)
        if k == self.at:
            ch.send(RecordType.FINAL_QUOTE, self._release.public, self.sent[-1])


class EarlyFinalQuote(Hostile):
    """Sends round ``at``'s FINAL_QUOTE before that round's ROUND_ACK (before
    it has the round's pages: a quote that cannot vouch for having them)."""
    at = 0

    def take(self, ch, rec):
        took = super().take(ch, rec)
        if took and self.asked - 1 == self.at:
            super().round_ended(ch)         # the quote now: before ROUND_END arrives
            self.sent.append(b"early")
        return took


@pytest.mark.parametrize("hostile,at", [(DuplicateFinalQuote, 0), (DuplicateFinalQuote, ROUNDS - 1),
                                        (EarlyFinalQuote, 0), (EarlyFinalQuote, ROUNDS - 1)])
def test_a_duplicated_or_early_final_quote_is_refused_before_release(tmp_path, hostile, at):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    attestor_b = trust.mode(b).attestor
    cls = type("D", (hostile,), {"at": at})
    m, res = migrate(trust.mode(a), lambda: cls(attestor_b))
    refused_at_home(m, keys, res, ProtocolError, "expected ROUND_ACK, destination sent FINAL_QUOTE")


# ------------------ the source's own NV write and mark, beside pre-copy
class OwnTpmFails(SecureMode):
    """A source whose own TPM cannot record the spent generation (NV write), or
    whose disk cannot make the migrated-away mark durable: both run beside
    pre-copy and must stop the migration before the pause, with nothing sent."""
    fails = "nv"

    def source_handshake(self, ch, hello_body):
        super().source_handshake(ch, hello_body)
        if self.fails == "escrow":
            return
        if self.fails == "nv":
            self._remember.result()         # (the real write ran: only its outcome is replaced)
            self._remember = _failed(OSError("nv: TPM NV write failed (injected)"))
        else:
            self._marking.result()
            self._marking = _failed(OSError("mark: fdatasync failed (injected)"))


    def at_pause(self, machine, peer):
        super().at_pause(machine, peer)
        if self.fails == "escrow":          # sealing the paused guest's keys, or the mark's fdatasync
            self._committing.result()
            self._committing = _failed(OSError("escrow: TPM seal failed (injected)"))


def _failed(exc):
    from concurrent.futures import Future
    f = Future()
    f.set_exception(exc)
    return f


@pytest.mark.parametrize("fails", ["nv", "mark", "escrow"])
def test_a_source_whose_own_nv_write_or_mark_fails_stops_before_the_pause(tmp_path, fails):
    """(escrow: at the pause, so after KEY_RELEASE went to the verified
    destination; it stops before COMMIT, and the destination discards.)"""
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    src = type("F", (OwnTpmFails,), {"fails": fails})(trust.mode(a).attestor)
    attestor_b = trust.mode(b).attestor
    m, res = migrate(src, lambda: SecureMode(attestor_b))
    err = res["source_error"]           # a named refusal, not a raw OSError (the VMM would die)
    what = {"nv": "this host's TPM could not record the VM's spent generation",
            "mark": "the migrated-away mark could not be made durable",
            "escrow": "the process keys could not be sealed to this host's TPM and marked"}[fails]
    assert isinstance(err, SecurityError) and what in str(err) and "injected" in str(err), res
    assert "incoming" not in res and "error" in res
    sent = [t for t, _ in res["relay"].seen]
    assert RecordType.COMMIT not in sent
    if fails != "escrow":
        assert RecordType.STATE not in sent and RecordType.KEY_RELEASE not in sent, sent
    assert_home_intact(m, keys, res)


# ------------------ the destination's NV write, beside pre-copy
class _Lazy:
    """A future whose work runs only when someone waits for it: an NV write
    slower than anything else in the session, deterministically."""
    def __init__(self, work):
        self._work, self._done = work, None

    def result(self, timeout=None):
        if self._done is None:
            self._done = _done(None)
            self._work()
        return self._done.result()

    def done(self):
        return self._done is not None


class AbortsInRoundZero(SecureMode):
    """An honest source whose migration fails after attestation (its guest,
    its disk, a cut: here it gives up as round 0 begins)."""
    def round_begins(self, ch):
        raise MigrationError("the source gives up (injected)")


def test_a_failed_session_leaves_the_generation_durable_before_the_next_one(tmp_path):
    """The destination advances the VM's generation beside pre-copy; a session
    that fails after attestation must not free the destination for the next
    session before that write is durable: else a copy of the VM announcing the
    same generation could pass the check meanwhile (a second running copy)."""
    from migrate.secure import generation
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    attestor_b = trust.mode(b).attestor
    m = guest()
    vm_id = m.migration_identity[0]
    m, res = migrate(AbortsInRoundZero(trust.mode(a).attestor), lambda: _SlowNoEarlyWrite(attestor_b),
                     m, via=None)
    assert "the source gives up" in str(res["source_error"]) and "error" in res
    assert m.migration_identity[1] == 1                 # the source spent generation 1
    # the destination's session is over: the generation it accepted is durable
    tpm = SoftTpm.open(b, startup=None)
    assert tpm.counter_read(generation.counter_name(vm_id)) == 1
    with pytest.raises(StaleGeneration, match="generation 1 is not newer than 1"):
        generation.check(tpm, vm_id, 1)


class _SlowNoEarlyWrite(SecureMode):
    """Destination: its generation write runs only when waited for."""
    def _advance_generation(self, vm_id, gen):
        from migrate.secure import generation
        return _Lazy(lambda: generation.accept(self.attestor.tpm, vm_id, gen))


# ----------------------------- 2. the source's quote goes first, to a rogue
def _ram_chunks(m):
    """Every 32-byte aligned piece of the guest's RAM that is not one byte
    repeated: a page that crossed, in clear or in a record the rogue can open
    with its session keys, shows up as some of them."""
    pages = m.ram.array.reshape(-1, PAGE_SIZE)
    nz = np.flatnonzero(pages.any(axis=1))
    chunks = pages[nz].reshape(-1, 32)
    keep = (chunks != chunks[:, :1]).any(axis=1)
    return {bytes(c) for c in chunks[keep]}


def _leaked(stream: bytes, chunks) -> int:
    return sum(stream[i:i + 32] in chunks for i in range(len(stream) - 31))


def _records(stream: bytes):
    out, at = [], 0
    while at + HEADER.size <= len(stream):
        rtype, _, n, _ = HEADER.unpack_from(stream, at)
        out.append((rtype, stream[at + HEADER.size:at + HEADER.size + n]))
        at += HEADER.size + n
    return out


def _rogue_issuer(trust, tmp_path):
    from migrate.measure import measure_start
    from migrate.secure.setup import protection_policy
    b = tmp_path / "rogue"
    measure_start(b, {"role": "destination"}, protection_policy())
    SoftTpm.open(b, startup=None, issuer=Issuer.create(tmp_path / "rogue-issuer"))
    return b, "unknown issuer"


def _unapproved(trust, tmp_path):
    return trust.host("rogue", insecure=("toctou",), role="destination"), \
        "measurement not approved by the policy"


def _keys_and_session_secrets(mode):
    return [mode.keys.s2d, mode.keys.d2s, mode.keys.release, mode.keys.commit]


@pytest.mark.parametrize("make_rogue", [_rogue_issuer, _unapproved])
def test_a_rogue_destination_gets_nothing_but_the_public_handshake(tmp_path, make_rogue):
    """The source sends its own quote before it verifies the destination's.  A
    rogue destination (unknown AK issuer / unapproved measurement) then holds
    HELLO, the source's key share and quote, and the source's ABORT: no WELCOME
    was answered, no record sealed, no page, no state, no key."""
    trust = Trust(tmp_path)
    a = trust.host("a")
    rogue, why = make_rogue(trust, tmp_path)
    m = guest()
    keys = dict(m.protection._keys)
    chunks = _ram_chunks(m)
    assert len(chunks) > 300, "the guest's RAM has content to look for"
    src = trust.mode(a)
    attestor_r = trust.mode(rogue).attestor
    m, res = migrate(src, lambda: SecureMode(attestor_r), m)
    err = res["source_error"]
    assert isinstance(err, AttestationFailed) and f"attestation of the destination failed: {why}" in str(err)
    assert "report" not in res and "incoming" not in res
    received = bytes(res["relay"].to_dest)
    types = [t for t, _ in _records(received)]
    assert types == [RecordType.HELLO, RecordType.KEY_SHARE, RecordType.QUOTE, RecordType.ABORT], types
    abort = _records(received)[-1][1]
    assert abort.startswith(b"AttestationFailed") or b"AttestationFailed" in abort[:64], abort[:80]
    assert _leaked(received, chunks) == 0
    page = next(iter(chunks))
    assert _leaked(received[:100] + page + received[100:], chunks) == 1     # (the scan sees a page)
    for k in list(keys.values()) + _keys_and_session_secrets(src):
        assert k not in received
    assert_home_intact(m, keys, res)


def test_with_attestation_off_the_rogue_gets_the_vm_and_its_keys(tmp_path):
    """The same rogue (unknown issuer) against a source with --insecure
    attestation: it receives the pages (its RAM holds the source's content)
    and the keys (it runs the protected keeper to its end)."""
    trust = Trust(tmp_path, configurations=({}, {"insecure": ("attestation",)}))
    a = trust.host("a", insecure=("attestation",))
    rogue, _ = _rogue_issuer(trust, tmp_path)
    m = guest()
    chunks = _ram_chunks(m)
    src = trust.mode(a, insecure=("attestation",))
    attestor_r = Attestor(rogue, trust.issuer, trust.policy)
    m, res = migrate(src, lambda: SecureMode(attestor_r, insecure=("attestation",)), m, via=None)
    assert res["report"].outcome == "completed", res
    d = res["incoming"].machine
    assert len(_ram_chunks(d) & chunks) > 300
    assert d.exits == {1: 0, 2: 0} and d.console.text(1).count("secret intact") == 30
