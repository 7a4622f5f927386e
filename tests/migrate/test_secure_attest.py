"""migrate/secure/attest.py outside a handshake: what it refuses before a quote exists.

The handshake tests (test_secure_attacks.py, test_secure_trust.py) verify real quotes;
these pin the parts they do not reach: a VMM pointed at a TPM directory that is not there
is refused (never given a fresh, uncertified TPM on the spot), unreadable trust settings
fail closed, and each verifier failure is reported in its own words.
"""

import pytest

from migrate.secure.attest import Attestor, describe_failure, load_anchor, load_policy
from migrate.secure.errors import AttestationFailed
from tpm import errors as tpm_errors


def test_a_missing_tpm_directory_is_refused_and_not_created(tmp_path):
    missing = tmp_path / "no-such-tpm"
    with pytest.raises(AttestationFailed, match="this VMM's TPM .*no-such-tpm"):
        Attestor(missing, tmp_path / "issuer", tmp_path / "policy.json")
    assert not missing.exists()


def test_unreadable_trust_settings_fail_closed(tmp_path):
    with pytest.raises(AttestationFailed, match="cannot load the trusted issuer"):
        load_anchor(tmp_path / "nothing")
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(AttestationFailed, match="cannot load the attestation policy"):
        load_policy(tmp_path / "policy.json")


@pytest.mark.parametrize("cls, words", [
    (tpm_errors.UnknownIssuerError, "unknown issuer"),
    (tpm_errors.CertificateError, "bad AK certificate"),
    (tpm_errors.SignatureError, "bad quote signature"),
    (tpm_errors.ReplayError, "stale or replayed nonce"),            # before its base class
    (tpm_errors.NonceMismatchError, "quote bound to another session"),
    (tpm_errors.EventLogReplayError, "event log does not replay"),
    (tpm_errors.PolicyViolationError, "not approved by the policy"),
    (tpm_errors.QuoteFormatError, "malformed evidence"),
    (tpm_errors.FormatError, "malformed evidence"),
    (tpm_errors.TpmRestartError, "TpmRestartError"),
])
def test_each_verifier_failure_has_its_own_words(cls, words):
    assert words in describe_failure(cls("x"))


def test_the_final_quote_must_come_from_the_same_tpm_in_the_same_state(tmp_path):
    """same_state() is the source's check of the FINAL_QUOTE against the handshake's
    quote: another TPM, even one in a state the policy approves, is named (dropping
    this check survived every secure test: issue 19's seeded-bug run)."""
    import os
    from securehelp import Trust
    from migrate.secure.attest import same_state

    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b")
    judge = Attestor(trust.host("judge", role="destination"), trust.issuer, trust.policy)

    def attest(tpm_dir):
        nonce, binding = os.urandom(32), os.urandom(32)
        evidence = Attestor(tpm_dir, trust.issuer, trust.policy).quote(nonce, binding)
        return judge.verify(evidence, nonce, binding, who="peer")

    first = attest(a)
    assert same_state(first, attest(a)) is None
    assert same_state(first, attest(b)) == "a different TPM answered the final quote"


def test_a_tpm_without_an_ak_certificate_does_not_quote(tmp_path):
    from migrate.measure import measure_start
    from migrate.secure.setup import protection_policy
    measure_start(tmp_path / "tpm", {"role": "source"}, protection_policy(insecure=()))
    attestor = Attestor(tmp_path / "tpm", tmp_path / "issuer", tmp_path / "policy.json")
    with pytest.raises(AttestationFailed, match="has no AK certificate"):
        attestor.quote(bytes(32), bytes(32))


def test_a_quote_over_fewer_pcrs_is_refused_even_if_the_policy_would_pass_it(tmp_path):
    """A peer's TPM quoting only PCRs 8 and 9 leaves its protection policy (PCR 10)
    unproven.  The generated policy requires PCR 10 itself; a hand-written one that
    does not must still not let such a quote through."""
    import json
    import os
    from securehelp import Trust
    from tpm import SoftTpm, bind_nonce

    trust = Trust(tmp_path)
    loose = json.loads(trust.policy.read_text())
    del loose["pcrs"]["10"]
    (tmp_path / "loose.json").write_text(json.dumps(loose))
    peer = SoftTpm.open(trust.host("peer"), startup=None, create=False)
    judge = Attestor(trust.host("judge", role="destination"), trust.issuer, tmp_path / "loose.json")
    nonce, binding = os.urandom(32), os.urandom(32)
    evidence = peer.quote(bind_nonce(nonce, binding), [8, 9]).to_bytes()
    with pytest.raises(AttestationFailed, match=r"quote covers PCRs \[8, 9\], expected \[8, 9, 10\]"):
        judge.verify(evidence, nonce, binding, who="peer")
