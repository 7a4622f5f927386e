"""The verifier: the happy path and every documented failure, each fail-closed."""

import hashlib
import time

import pytest

from tpm import AttestationPolicy, Issuer, SoftTpm, Verifier, bind_nonce, keys, measure_vmm
from tpm.errors import (
    CertificateError,
    EventLogReplayError,
    NonceMismatchError,
    PcrDigestMismatchError,
    PolicyViolationError,
    QuoteFormatError,
    ReplayError,
    SignatureError,
    StaleQuoteError,
    UnknownIssuerError,
    VerificationError,
)
from tpm.eventlog import Event, EventLog, EventType
from tpm.evidence import Evidence, _marshal
from tpm.issuer import AkCertificate
from tpm.quote import Attest

from tpm_testdata import CONFIG, PROTECTION


def _rebuild(ev: Evidence, *, attest=None, signature=None, cert=None, log=None) -> bytes:
    return _marshal(
        attest if attest is not None else ev.attest_bytes,
        signature if signature is not None else ev.signature,
        cert if cert is not None else ev.certificate_bytes,
        log if log is not None else ev.eventlog_bytes,
    )


def test_accepts_an_approved_host(measured, policy, verifier):
    nonce = verifier.new_nonce()
    result = verifier.verify(measured.quote(nonce).to_bytes(), policy)
    assert result.host == "host-a"
    assert result.nonce == nonce
    assert result.ak_name == measured.ak_name
    assert sorted(result.pcr_values) == [8, 9, 10]
    assert result.pcr_values[8] == measured.read_pcr(8)
    assert [e.type for e in result.events] == [EventType.VMM_CODE, EventType.VMM_CONFIG, EventType.VMM_POLICY]


def test_accepts_evidence_objects_and_issuer_paths(measured, policy, issuer):
    v = Verifier([issuer.directory])
    nonce = v.new_nonce()
    v.verify(measured.quote(nonce), policy)


def test_truncated_quote(measured, policy, verifier):
    raw = measured.quote(verifier.new_nonce()).to_bytes()
    with pytest.raises(QuoteFormatError):
        verifier.verify(raw[: len(raw) // 2], policy)


def test_wrong_nonce(measured, policy, verifier):
    raw = measured.quote(b"\x01" * 32).to_bytes()
    with pytest.raises(NonceMismatchError):
        verifier.verify(raw, policy, expected_nonce=b"\x02" * 32)


def test_unknown_issuer(tmp_path, measured, policy):
    stranger = Verifier([Issuer.create(tmp_path / "other-ca").public_key])
    with pytest.raises(UnknownIssuerError):
        stranger.verify(measured.quote(stranger.new_nonce()).to_bytes(), policy)


def test_uncertified_tpm_is_unknown(tmp_path, policy, verifier, vmm_code):
    loose = SoftTpm.open(tmp_path / "loose")
    measure_vmm(loose, [vmm_code], CONFIG, PROTECTION)
    with pytest.raises(UnknownIssuerError, match="no AK certificate"):
        verifier.verify(loose.quote(verifier.new_nonce()).to_bytes(), policy)


def test_self_made_certificate_for_a_trusted_issuer_id_is_rejected(measured, policy, verifier, issuer):
    """An attacker copies the trusted issuer's key id but signs with its own key."""
    ev = measured.quote(verifier.new_nonce())
    cert = ev.certificate
    impostor = Issuer(keys.generate_private_key(), "impostor")
    forged = impostor.certify(cert.ak_public, cert.subject)
    forged = AkCertificate(issuer.key_id, forged.subject, forged.ak_public, forged.signature)
    with pytest.raises(CertificateError):
        verifier.verify(_rebuild(ev, cert=forged.to_bytes()), policy)


def test_replayed_old_quote(measured, policy, verifier):
    raw = measured.quote(verifier.new_nonce()).to_bytes()
    verifier.verify(raw, policy)
    with pytest.raises(ReplayError, match="already used"):
        verifier.verify(raw, policy)
    assert StaleQuoteError is ReplayError and issubclass(ReplayError, NonceMismatchError)


def test_nonce_never_issued(measured, policy, verifier):
    with pytest.raises(ReplayError, match="never issued"):
        verifier.verify(measured.quote(b"\x07" * 32).to_bytes(), policy)


def test_expired_nonce(measured, policy, issuer):
    v = Verifier([issuer.public_key], nonce_lifetime=0.0)
    nonce = v.new_nonce()
    time.sleep(0.01)
    with pytest.raises(ReplayError, match="expired"):
        v.verify(measured.quote(nonce).to_bytes(), policy)


def test_expected_nonce_that_verifier_issued_is_consumed(measured, policy, verifier):
    nonce = verifier.new_nonce()
    raw = measured.quote(nonce).to_bytes()
    verifier.verify(raw, policy, expected_nonce=nonce)
    with pytest.raises(ReplayError):
        verifier.verify(raw, policy, expected_nonce=nonce)


def test_transcript_bound_nonce(measured, policy, verifier):
    nonce = verifier.new_nonce()
    transcript = hashlib.sha256(b"ecdh transcript").digest()
    raw = measured.quote(bind_nonce(nonce, transcript)).to_bytes()
    with pytest.raises(NonceMismatchError):  # a different transcript (MITM'd key exchange)
        verifier.verify(raw, policy, expected_nonce=bind_nonce(nonce, b"other"))
    verifier.verify(raw, policy, expected_nonce=bind_nonce(nonce, transcript))
    verifier.consume_nonce(nonce)
    with pytest.raises(ReplayError):
        verifier.consume_nonce(nonce)


def test_event_log_that_does_not_replay(measured, policy, verifier):
    measured.extend(8, hashlib.sha256(b"rootkit").digest(), data=b"rootkit.ko")
    ev = measured.quote(verifier.new_nonce())
    # The host hides the unapproved event from the log it sends.
    hidden = EventLog([e for e in ev.event_log if e.data != b"rootkit.ko"]).to_bytes()
    with pytest.raises(EventLogReplayError):
        verifier.verify(_rebuild(ev, log=hidden), policy)
    assert issubclass(EventLogReplayError, PcrDigestMismatchError)


def test_event_data_that_lies_about_its_digest(measured, policy, verifier):
    ev = measured.quote(verifier.new_nonce())
    events = list(ev.event_log)
    events[1] = Event(events[1].pcr, events[1].type, events[1].digest, b'{"memory_mb":9999}')
    with pytest.raises(EventLogReplayError, match="not SHA-256 of its data"):
        verifier.verify(_rebuild(ev, log=EventLog(events).to_bytes()), policy)


def test_modified_attest_breaks_signature(measured, policy, verifier):
    ev = measured.quote(verifier.new_nonce())
    a = ev.attest
    forged = Attest(a.qualified_signer, a.extra_data, a.clock_info, a.firmware_version, a.selection, bytes(32))
    with pytest.raises(SignatureError):
        verifier.verify(_rebuild(ev, attest=forged.to_bytes()), policy)


def test_quote_from_another_certified_tpm_with_swapped_cert(tmp_path, measured, policy, verifier, issuer):
    other = SoftTpm.open(tmp_path / "host-b", issuer=issuer)
    ev = other.quote(verifier.new_nonce())
    mine = measured.ak_certificate.to_bytes()
    with pytest.raises(SignatureError):
        verifier.verify(_rebuild(ev, cert=mine), policy)


def test_restricted_key_cannot_be_used_to_forge_a_quote(measured, policy, verifier):
    """Without the restricted-key check, sign() would let the host forge any quote."""
    ev = measured.quote(verifier.new_nonce())
    a = ev.attest
    forged = Attest(a.qualified_signer, a.extra_data, a.clock_info, a.firmware_version, a.selection, bytes(32))
    from tpm.errors import RestrictedKeyError

    with pytest.raises(RestrictedKeyError):
        measured.sign(forged.to_bytes())


def test_unapproved_extend_violates_policy(measured, policy, verifier):
    measured.extend(8, hashlib.sha256(b"rootkit").digest(), data=b"rootkit.ko")
    with pytest.raises(PolicyViolationError, match="unapproved measurement in PCR 8"):
        verifier.verify(measured.quote(verifier.new_nonce()).to_bytes(), policy)


@pytest.mark.parametrize(
    "change",
    [
        lambda code, cfg, prot: (code.joinpath("cpu.py").write_text("def run():\n    return 43\n"), cfg, prot),
        lambda code, cfg, prot: (None, {**cfg, "memory_mb": 32}, prot),
        lambda code, cfg, prot: (None, cfg, {**prot, "cloaking": False}),
    ],
    ids=["code", "config", "protection-policy"],
)
def test_any_change_to_the_vmm_changes_the_quote(tmp_path, issuer, verifier, vmm_code, policy, change):
    tpm = SoftTpm.open(tmp_path / "h2", issuer=issuer)
    _, cfg, prot = change(vmm_code, dict(CONFIG), dict(PROTECTION))
    measure_vmm(tpm, [vmm_code], cfg, prot)
    with pytest.raises(PolicyViolationError):
        verifier.verify(tpm.quote(verifier.new_nonce()).to_bytes(), policy)


def test_quote_must_cover_the_policy_pcrs(measured, policy, verifier):
    with pytest.raises(PolicyViolationError, match="does not cover PCR 10"):
        verifier.verify(measured.quote(verifier.new_nonce(), pcrs=[8, 9]).to_bytes(), policy)


def test_unmeasured_pcr_fails(tpm, verifier, measured):
    measured.reset()
    policy = AttestationPolicy({8: [(EventType.VMM_CODE, bytes(32))]})
    with pytest.raises(PolicyViolationError, match="never measured"):
        verifier.verify(measured.quote(verifier.new_nonce()).to_bytes(), policy)


def test_forged_evidence_does_not_burn_the_nonce(measured, policy, verifier):
    """Checks before freshness are authenticity checks: garbage cannot consume a nonce."""
    nonce = verifier.new_nonce()
    good = measured.quote(nonce)
    a = good.attest
    forged = Attest(a.qualified_signer, a.extra_data, a.clock_info, a.firmware_version, a.selection, bytes(32))
    with pytest.raises(SignatureError):
        verifier.verify(_rebuild(good, attest=forged.to_bytes()), policy)
    verifier.verify(good.to_bytes(), policy)  # the honest quote still verifies


def test_every_failure_is_a_verification_error():
    for cls in (
        QuoteFormatError, NonceMismatchError, ReplayError, UnknownIssuerError, CertificateError,
        SignatureError, EventLogReplayError, PolicyViolationError,
    ):
        assert issubclass(cls, VerificationError)


def test_verifier_does_not_import_the_tpm():
    import tpm.verifier as v

    source = open(v.__file__).read()
    assert "softtpm" not in source.split('"""', 2)[2]


# -- issue 19, attestation: the VERIFIER checks the signer and the key it certified ----------
def _signed_by(tpm: SoftTpm, attest: Attest) -> bytes:
    """What a TPM with this AK would sign if it (or its software) were buggy or hostile:
    any TPMS_ATTEST, with a valid signature by the certified AK."""
    return keys.sign(tpm._ak, attest.to_bytes())


def _with_signer(a: Attest, signer: bytes) -> Attest:
    return Attest(signer, a.extra_data, a.clock_info, a.firmware_version, a.selection, a.pcr_digest)


@pytest.mark.parametrize("which", ["plain-name", "owner-hierarchy", "other-ak", "ek"])
def test_quote_whose_qualified_signer_is_not_the_certified_aks_is_refused(
    tmp_path, measured, policy, verifier, issuer, which
):
    """Signature valid, certificate valid, nonce fresh: only the qualifiedSigner is wrong."""
    ev = measured.quote(verifier.new_nonce())
    other = SoftTpm.open(tmp_path / "other", issuer=issuer)
    signer = {
        "plain-name": measured.ak_name,  # what the model used to write
        "owner-hierarchy": keys.qualified_name(
            keys.hierarchy_qualified_name(keys.TPM_RH_OWNER), measured.ak_name),  # same key, other parent
        "other-ak": other.ak_qualified_name,
        "ek": measured.ak_parent_qualified_name,
    }[which]
    forged = _with_signer(ev.attest, signer)
    raw = _rebuild(ev, attest=forged.to_bytes(), signature=_signed_by(measured, forged))
    with pytest.raises(SignatureError, match="qualifiedSigner is not the certified AK's Qualified Name"):
        verifier.verify(raw, policy)
    verifier.verify(ev.to_bytes(), policy)  # the honest quote (same nonce) still verifies


def _issuer_signed(issuer: Issuer, cert: AkCertificate) -> AkCertificate:
    """A certificate the trusted issuer signed without its own restricted-key check
    (a careless or compromised CA): the verifier must not rely on that check."""
    return AkCertificate(cert.issuer_key_id, cert.subject, cert.ak_public,
                         keys.sign(issuer._key, cert.tbs()), cert.parent_qualified_name)


@pytest.mark.parametrize("missing,what", [(keys.RESTRICTED, "restricted"), (keys.SIGN, "signing"),
                                          (keys.FIXED_TPM, "fixedTPM")])
def test_quote_signed_by_a_certified_unrestricted_key_is_refused(
    measured, policy, verifier, issuer, missing, what
):
    """The host holds an unrestricted key the issuer certified; with it it signs a
    TPMS_ATTEST of its choosing (here: the honest one, so every other check passes)."""
    ev = measured.quote(verifier.new_nonce())
    loose = keys.generate_private_key()
    public = keys.public_area(loose.public_key(), attributes=keys.AK_ATTRIBUTES & ~missing)
    cert = _issuer_signed(issuer, AkCertificate(issuer.key_id, "host-a", public, b"",
                                                measured.ak_parent_qualified_name))
    attest = _with_signer(ev.attest, cert.ak_qualified_name)
    raw = _rebuild(ev, attest=attest.to_bytes(), signature=keys.sign(loose, attest.to_bytes()),
                   cert=cert.to_bytes())
    with pytest.raises(CertificateError, match=f"not a {what} key"):
        verifier.verify(raw, policy)
    verifier.verify(ev.to_bytes(), policy)  # the nonce was not burnt


def test_same_forgery_with_a_restricted_key_passes_every_other_check(measured, policy, verifier, issuer):
    """Control for the test above: with the restricted bit set the very same construction
    verifies, so it is the attribute check alone that refuses it."""
    ev = measured.quote(verifier.new_nonce())
    loose = keys.generate_private_key()
    public = keys.public_area(loose.public_key())
    cert = _issuer_signed(issuer, AkCertificate(issuer.key_id, "host-a", public, b"",
                                                measured.ak_parent_qualified_name))
    attest = _with_signer(ev.attest, cert.ak_qualified_name)
    raw = _rebuild(ev, attest=attest.to_bytes(), signature=keys.sign(loose, attest.to_bytes()),
                   cert=cert.to_bytes())
    verifier.verify(raw, policy)


def test_version_1_certificate_is_refused(measured, policy, verifier, issuer):
    ev = measured.quote(verifier.new_nonce())
    c = ev.certificate
    v1 = AkCertificate(c.issuer_key_id, c.subject, c.ak_public, b"", b"", 1)
    v1 = AkCertificate(c.issuer_key_id, c.subject, c.ak_public, keys.sign(issuer._key, v1.tbs()), b"", 1)
    assert AkCertificate.from_bytes(v1.to_bytes()) == v1  # old state directories still open
    with pytest.raises(CertificateError, match="version 1"):
        verifier.verify(_rebuild(ev, cert=v1.to_bytes()), policy)


def test_tampered_event_log_does_not_burn_the_nonce(measured, policy, verifier):
    """The log is not signed: a man in the middle can change it.  The verifier refuses it
    before it consumes the nonce, so the honest answer to the same nonce still verifies."""
    nonce = verifier.new_nonce()
    good = measured.quote(nonce)
    events = list(good.event_log)[:-1]  # drop the policy event
    with pytest.raises(EventLogReplayError):
        verifier.verify(_rebuild(good, log=EventLog(events).to_bytes()), policy)
    verifier.verify(good.to_bytes(), policy)


# -- issue 11 item 3: reset/restart between two quotes (the secure protocol's TOCTOU check) --
def _verified(tpm, verifier, policy):
    return verifier.verify(tpm.quote(verifier.new_nonce()).to_bytes(), policy)


def test_same_boot_quotes_pass_require_same_boot(measured, policy, verifier):
    from tpm import require_same_boot

    first = _verified(measured, verifier, policy)
    second = _verified(SoftTpm.open(measured.state_dir, startup=None), verifier, policy)  # attach, no startup
    require_same_boot(first, second)
    assert first.clock_info.reset_count == second.clock_info.reset_count


@pytest.mark.parametrize("between,message", [
    (lambda tpm: tpm.reset(), "TPM Reset between the quotes"),
    (lambda tpm: tpm.resume(), "TPM Restart or Resume between the quotes"),
    (lambda tpm: SoftTpm.open(tpm.state_dir), "TPM Reset between the quotes"),  # a new process = power cycle
])
def test_a_reset_or_restart_between_two_quotes_is_refused(measured, policy, verifier, vmm_code,
                                                          between, message):
    """The host is re-measured to the very same PCR values after the reset, so the second
    quote verifies on its own: only the counts in clockInfo show what happened."""
    from tpm import require_same_boot
    from tpm.errors import TpmRestartError

    first = _verified(measured, verifier, policy)
    between(measured)
    again = SoftTpm.open(measured.state_dir, startup=None)
    if len(again.event_log()) == 0:
        measure_vmm(again, [vmm_code], CONFIG, PROTECTION)
    second = _verified(again, verifier, policy)
    assert second.pcr_values == first.pcr_values
    with pytest.raises(TpmRestartError, match=message):
        require_same_boot(first, second)


def test_quotes_from_two_aks_are_not_the_same_boot(tmp_path, measured, policy, verifier, issuer, vmm_code):
    from tpm import require_same_boot
    from tpm.errors import TpmRestartError

    other = SoftTpm.open(tmp_path / "other", issuer=issuer)
    measure_vmm(other, [vmm_code], CONFIG, PROTECTION)
    a, b = _verified(measured, verifier, policy), _verified(other, verifier, policy)
    assert a.clock_info.reset_count == b.clock_info.reset_count  # both at their first boot
    with pytest.raises(TpmRestartError, match="different attestation keys"):
        require_same_boot(a, b)


# -------------------------------------------------- nonce bookkeeping (seeded bugs)
# The verifier's memory of nonces, exactly: which issued nonces it keeps, which
# consumed ones it still recognises as replays, and when one expires.  Time is the
# verifier's own clock, replaced by a settable one (no sleeping, no wall clock).


class _Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import tpm.verifier as verifier_module

    c = _Clock()
    monkeypatch.setattr(verifier_module, "time", c)
    return c


def test_new_nonces_are_32_random_bytes(verifier):
    nonces = {verifier.new_nonce() for _ in range(8)}
    assert len(nonces) == 8 and all(len(n) == 32 for n in nonces)


def test_outstanding_nonces_are_capped_oldest_first(issuer):
    v = Verifier([issuer.public_key], max_outstanding=2)
    n1, n2, n3 = v.new_nonce(), v.new_nonce(), v.new_nonce()
    with pytest.raises(ReplayError, match="never issued"):
        v.consume_nonce(n1)            # the oldest was forgotten to keep the cap
    v.consume_nonce(n2)
    v.consume_nonce(n3)


def test_consumed_nonces_are_remembered_for_four_times_the_cap(issuer):
    v = Verifier([issuer.public_key], max_outstanding=1)
    used = []
    for _ in range(5):
        used.append(v.new_nonce())
        v.consume_nonce(used[-1])
    with pytest.raises(ReplayError, match="never issued"):
        v.consume_nonce(used[0])       # beyond the bounded memory: the oldest is gone
    for n in used[1:]:
        with pytest.raises(ReplayError, match="already used"):
            v.consume_nonce(n)


def test_a_nonce_expires_after_its_lifetime_and_is_spent(issuer, clock):
    v = Verifier([issuer.public_key], nonce_lifetime=10.0)
    on_time, late = v.new_nonce(), v.new_nonce()
    clock.now += 10.0
    v.consume_nonce(on_time)           # exactly at the lifetime: still valid
    clock.now += 0.5
    with pytest.raises(ReplayError, match="expired"):
        v.consume_nonce(late)
    with pytest.raises(ReplayError, match="already used"):
        v.consume_nonce(late)          # an expired nonce cannot be tried again


def test_without_a_lifetime_nonces_never_expire(issuer, clock):
    v = Verifier([issuer.public_key], nonce_lifetime=None)
    n = v.new_nonce()
    clock.now += 1e9
    v.consume_nonce(n)


def test_expected_nonce_consumed_before_is_a_replay(measured, policy, verifier):
    nonce = verifier.new_nonce()
    verifier.consume_nonce(nonce)
    with pytest.raises(ReplayError, match="already used"):
        verifier.verify(measured.quote(nonce).to_bytes(), policy, expected_nonce=nonce)


def test_expected_nonce_not_issued_here_is_accepted_and_not_remembered(measured, policy, verifier):
    nonce = b"\x11" * 32               # the caller's own nonce (e.g. bound to a transcript)
    raw = measured.quote(nonce).to_bytes()
    verifier.verify(raw, policy, expected_nonce=nonce)
    verifier.verify(raw, policy, expected_nonce=nonce)   # replay protection is the caller's
    with pytest.raises(ReplayError, match="never issued"):
        verifier.consume_nonce(nonce)


def test_the_default_lifetime_is_five_minutes_and_the_cap_1024(issuer, clock):
    v = Verifier([issuer.public_key])
    first, second = v.new_nonce(), v.new_nonce()
    for _ in range(1022):
        v.new_nonce()
    on_time, late = v.new_nonce(), v.new_nonce()   # 1026 issued: the oldest two are forgotten
    for forgotten in (first, second):
        with pytest.raises(ReplayError, match="never issued"):
            v.consume_nonce(forgotten)
    clock.now += 300.0
    v.consume_nonce(on_time)
    clock.now += 0.5
    with pytest.raises(ReplayError, match="expired"):
        v.consume_nonce(late)


@pytest.mark.parametrize("anchor", ["issuer", "public key", "directory", "directory as text"])
def test_every_documented_form_of_trust_anchor_is_taken(measured, policy, issuer, anchor):
    t = {"issuer": issuer, "public key": issuer.public_key, "directory": issuer.directory,
         "directory as text": str(issuer.directory)}[anchor]
    v = Verifier([t])
    assert v.verify(measured.quote(v.new_nonce()), policy).host == "host-a"


def test_a_trust_anchor_of_another_kind_is_refused():
    with pytest.raises(TypeError, match="trust anchors are P-256 public keys"):
        Verifier([b"not a key"])


# -------------------------------------------------- issue 19i: the rest of the seeded bugs
def test_a_verification_result_cannot_be_altered_after_the_fact(measured, policy, verifier):
    """The result is what the checks established; code that holds it (the secure
    mode keeps it until the same-boot check) must not be able to rewrite it."""
    import dataclasses

    result = verifier.verify(measured.quote(verifier.new_nonce()), policy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.host = "host-b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.pcr_values = {}


@pytest.mark.parametrize("damage", ["point off the curve", "RSA type", "truncated"])
def test_a_certified_public_area_that_does_not_parse_is_a_certificate_error(
    measured, policy, verifier, issuer, damage
):
    """A careless issuer signed a certificate whose AK public area is not a P-256
    signing key: the verifier refuses the certificate (a CertificateError naming the
    fault, not a crash), before it looks at the quote, and the nonce is not burnt."""
    ev = measured.quote(verifier.new_nonce())
    good = measured.ak_certificate.ak_public
    zero = (32).to_bytes(2, "big") + bytes(32)
    bad = {"point off the curve": good[:-68] + zero + zero,      # unique.x = unique.y = 0
           "RSA type": (0x0001).to_bytes(2, "big") + good[2:],   # TPM_ALG_RSA
           "truncated": good[:-1]}[damage]
    cert = _issuer_signed(issuer, AkCertificate(issuer.key_id, "host-a", bad, b"",
                                                measured.ak_parent_qualified_name))
    with pytest.raises(CertificateError, match="AK certificate: "):
        verifier.verify(_rebuild(ev, cert=cert.to_bytes()), policy)
    verifier.verify(ev.to_bytes(), policy)
