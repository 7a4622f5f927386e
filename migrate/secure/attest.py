"""Attestation before trust (DESIGN §6, obligation 1).

Each side quotes PCRs 8-10 (VMM code, configuration, protection policy) with
its host TPM's attestation key; the quote's qualifying data binds the peer's
fresh nonce *and* the session (``tpm.bind_nonce(peer_nonce, binding)`` with the
transcript hash, which covers both X25519 key shares).  The peer verifies with
``tpm.Verifier`` -- issuer and AK certificate, signature, the bound nonce,
event-log replay, the policy of approved measurements -- and fails closed with
:class:`AttestationFailed` naming what failed.  A quote from another session,
another key share, or an older nonce cannot verify.

The policy file and the issuer (the trust anchor) are read at each handshake
and must still be what this VMM measured into PCR 10 at start
(``migrate.secure.trust``): approving a new build means restarting the VMM,
so that its peers can see what it now trusts.
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

from tpm import (AttestationPolicy, AttestationResult, SoftTpm, Verifier, bind_nonce, load_trust_anchor,
                 require_same_boot)
from tpm import errors as tpm_errors
from tpm.measure import VMM_PCRS

from migrate.secure import workers
from migrate.secure.errors import AttestationFailed

QUOTED_PCRS = tuple(VMM_PCRS)          # 8, 9, 10

# What each verifier failure means, in words a user can act on.
_WHAT = [
    (tpm_errors.UnknownIssuerError, "unknown issuer (AK certificate not from the trusted issuer)"),
    (tpm_errors.CertificateError, "bad AK certificate"),
    (tpm_errors.SignatureError, "bad quote signature"),
    (tpm_errors.ReplayError, "stale or replayed nonce"),
    (tpm_errors.NonceMismatchError, "stale nonce or quote bound to another session"),
    (tpm_errors.EventLogReplayError, "event log does not replay to the quoted PCRs"),
    (tpm_errors.PolicyViolationError, "measurement not approved by the policy"),
    (tpm_errors.QuoteFormatError, "malformed evidence"),
    (tpm_errors.FormatError, "malformed evidence"),
]


def describe_failure(exc: Exception) -> str:
    for cls, what in _WHAT:
        if isinstance(exc, cls):
            return what
    return type(exc).__name__


def load_anchor(path: Path | str):
    path = Path(path)
    try:
        return load_trust_anchor(path)       # an issuer directory or its issuer.pub.pem
    except (OSError, tpm_errors.TpmError, ValueError) as exc:
        raise AttestationFailed(f"cannot load the trusted issuer from {path}: {exc}") from None


def load_policy(path: Path | str) -> AttestationPolicy:
    try:
        return AttestationPolicy.load(path)
    except (OSError, tpm_errors.TpmError, ValueError) as exc:
        raise AttestationFailed(f"cannot load the attestation policy {path}: {exc}") from None


_TPMS: dict[Path, SoftTpm] = {}
_TPMS_LOCK = threading.Lock()


def host_tpm(tpm_dir: Path) -> SoftTpm:
    """This process's handle on the host TPM in ``tpm_dir``, one per directory.
    A handle keeps what it read of the TPM's files until they change, and a
    new handle's first quote persists the clock ahead again (an fsync): a
    destination serving many migrations would pay both at every session's
    handshake.  Sharing is safe: a handle serialises its commands and re-reads
    whatever another process changed (tpm/softtpm.py)."""
    key = Path(tpm_dir).resolve()
    with _TPMS_LOCK:
        tpm = _TPMS.get(key)
        if tpm is None or not (key / "tpm-state.bin").exists():
            tpm = _TPMS[key] = SoftTpm.open(key, startup=None, create=False)
        return tpm


class Attestor:
    """This VMM's TPM (to quote) and its verifier of peers (issuer + policy)."""

    def __init__(self, tpm_dir: Path | str, issuer: Path | str, policy: Path | str, *, trust: bytes | None = None):
        self.tpm_dir = Path(tpm_dir)
        self.issuer_path = issuer
        self.policy_path = policy
        self.trust = trust          # the trust event's digest measured at start (migrate.secure.trust)
        try:
            self.tpm = host_tpm(self.tpm_dir)
        except tpm_errors.TpmError as exc:
            raise AttestationFailed(f"this VMM's TPM {self.tpm_dir}: {exc}") from None
        workers.prepare()           # the protocol's side-work threads, started now (workers.py)

    def quote(self, peer_nonce: bytes, binding: bytes) -> bytes:
        """Evidence over PCRs 8-10 whose qualifying data binds the peer's nonce and ``binding``."""
        if not self.tpm.certified:
            raise AttestationFailed(f"this VMM's TPM {self.tpm_dir} has no AK certificate "
                                    f"(certify it: minivmm attest-setup, or minivmm-tpm init --issuer)")
        return self.tpm.quote_bytes(bind_nonce(peer_nonce, binding), list(QUOTED_PCRS))

    def verify(self, evidence: bytes, my_nonce: bytes, binding: bytes, *, who: str) -> AttestationResult:
        anchor = load_anchor(self.issuer_path)
        policy = load_policy(self.policy_path)
        if self.trust is not None:      # judge peers only by the settings this VMM attested to
            from migrate.secure.trust import check_unchanged
            check_unchanged(self.trust, anchor, policy)
        verifier = Verifier([anchor], nonce_lifetime=None)
        try:
            result = verifier.verify(bytes(evidence), policy, expected_nonce=bind_nonce(my_nonce, binding))
        except tpm_errors.TpmError as exc:
            raise AttestationFailed(f"attestation of the {who} failed: {describe_failure(exc)}: {exc}") from None
        if tuple(result.selection) != QUOTED_PCRS:
            raise AttestationFailed(f"attestation of the {who} failed: quote covers PCRs "
                                    f"{list(result.selection)}, expected {list(QUOTED_PCRS)}")
        return result


def same_state(first: AttestationResult, second: AttestationResult) -> str | None:
    """None if ``second`` proves the same TPM in the same measured state as
    ``first``, without a TPM Reset or Restart in between; otherwise what
    differs (compared in constant time).

    Equal PCRs alone do not mean "unchanged since": a reset clears them, and
    a host that is reset (rebooted, or another VMM started on its TPM: a
    measured start is a TPM Reset), runs something unapproved, and is reset
    again into the attested VMM shows the attested values again, under the
    same AK.  Only the quotes' resetCount and restartCount show it
    (``tpm.require_same_boot``); hostile review, test_secure_pipeline_attacks."""
    if not hmac.compare_digest(first.ak_name, second.ak_name):
        return "a different TPM answered the final quote"
    for pcr, value in first.pcr_values.items():
        if not hmac.compare_digest(value, second.pcr_values.get(pcr, b"")):
            return f"PCR {pcr} changed since attestation"
    try:
        require_same_boot(first, second)
    except tpm_errors.TpmRestartError as exc:
        return f"TPM was reset or restarted since attestation: {exc}"
    return None
