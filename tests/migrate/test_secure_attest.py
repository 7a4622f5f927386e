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
