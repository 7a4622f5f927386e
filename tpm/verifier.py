"""The remote-attestation verifier.  It never trusts the TPM's own word.

Everything the verifier believes it derives itself, from bytes, in this order —
and it stops at the first failure (fail closed; nothing is partially accepted):

1. **Format.**  Parse the evidence bundle with bounded parsers
   (QuoteFormatError).  An ``Evidence`` object is re-marshalled and re-parsed, so
   parsed views built elsewhere are never trusted.
2. **Issuer.**  The AK certificate must name an issuer whose public key is one of
   this verifier's trust anchors (UnknownIssuerError), carry a valid signature by it,
   and certify a fixedTPM *restricted* signing key (CertificateError).  Only a
   restricted key's signature proves the TPMS_ATTEST was made by the TPM.
3. **Signature.**  ECDSA-P256/SHA-256 over the exact TPMS_ATTEST bytes, under the
   certified AK, and the quote's qualifiedSigner must be that AK's *Qualified Name*,
   computed here from the certified parent Qualified Name and the certified public
   area (TPM 2.0 Part 1, clause 16) (SignatureError).  A version 1 certificate, which
   names no parent, is refused (CertificateError).
4. **Event log.**  Self-describing events must hash to their digest, and replaying
   the log from zero must reproduce the quoted pcrDigest over the quoted selection
   (EventLogReplayError).
5. **Freshness.**  extraData must be a nonce this verifier issued and has not yet
   seen, or the caller's ``expected_nonce`` (NonceMismatchError; ReplayError for a
   nonce consumed before, never issued, or expired).  Checked *after* everything
   that authenticates the evidence (signature, and the log against the signed
   digest), so that forged or tampered evidence cannot burn an honest host's nonce.
6. **Policy.**  The replayed events must be approved (PolicyViolationError).

:func:`require_same_boot` compares two verified quotes for the time-of-check /
time-of-use check of a protocol that attests a host, then later relies on it still
being in the attested state (e.g. quote before and after a migration): a TPM Reset
clears the PCRs, so a host could be rebooted into something else in between, and
only resetCount/restartCount show it.

This module imports nothing from ``tpm.softtpm``.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from . import keys
from .errors import (
    CertificateError,
    EventLogReplayError,
    FormatError,
    NonceMismatchError,
    ReplayError,
    SignatureError,
    TpmRestartError,
    UnknownIssuerError,
)
from .eventlog import Event
from .evidence import Evidence
from .issuer import CERT_VERSION, Issuer, key_id, load_trust_anchor
from .pcr import PcrSelection
from .policy import AttestationPolicy
from .quote import ClockInfo

NONCE_SIZE = 32


@dataclass(frozen=True)
class AttestationResult:
    """What a successful verification established."""

    host: str  #: subject of the AK certificate
    ak_name: bytes
    issuer_key_id: bytes
    nonce: bytes  #: the quote's extraData
    clock_info: ClockInfo
    selection: PcrSelection
    pcr_values: dict[int, bytes]  #: replayed values of the selected PCRs
    events: tuple[Event, ...]  #: the approved events in the policy's PCRs


class Verifier:
    """Verifies evidence from host TPMs against a policy.

    ``trusted_issuers``: issuer public keys (or ``Issuer`` objects, or paths to an
    issuer directory / ``issuer.pub.pem``) whose AK certificates this verifier accepts.
    ``nonce_lifetime``: seconds an issued nonce stays valid (None: no expiry).
    """

    def __init__(
        self,
        trusted_issuers: Iterable[ec.EllipticCurvePublicKey | Issuer | Path | str],
        *,
        nonce_lifetime: float | None = 300.0,
        max_outstanding: int = 1024,
    ) -> None:
        self._anchors: dict[bytes, ec.EllipticCurvePublicKey] = {}
        for t in trusted_issuers:
            if isinstance(t, Issuer):
                t = t.public_key
            elif isinstance(t, (str, Path)):
                t = load_trust_anchor(t)
            if not isinstance(t, ec.EllipticCurvePublicKey):
                raise TypeError("trust anchors are P-256 public keys, Issuers or paths")
            self._anchors[key_id(t)] = t
        self._nonce_lifetime = nonce_lifetime
        self._max_outstanding = max_outstanding
        self._outstanding: OrderedDict[bytes, float] = OrderedDict()
        self._consumed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------- nonces
    def new_nonce(self) -> bytes:
        """A fresh 32-byte nonce, remembered until used once (or expired)."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        with self._lock:
            self._outstanding[nonce] = time.monotonic()
            while len(self._outstanding) > self._max_outstanding:
                self._outstanding.popitem(last=False)
        return nonce

    def consume_nonce(self, nonce: bytes) -> None:
        """Mark an issued nonce used; ReplayError if it was used, never issued or expired."""
        with self._lock:
            issued = self._outstanding.pop(bytes(nonce), None)
            if issued is None:
                if bytes(nonce) in self._consumed:
                    raise ReplayError("nonce already used: this quote is a replay")
                raise ReplayError("nonce was never issued by this verifier (replayed or forged quote)")
            self._consumed[bytes(nonce)] = None
            while len(self._consumed) > 4 * self._max_outstanding:
                self._consumed.popitem(last=False)
        if self._nonce_lifetime is not None and time.monotonic() - issued > self._nonce_lifetime:
            raise ReplayError("nonce expired: the quote is stale")

    # ------------------------------------------------------------- verify
    def verify(
        self,
        evidence: bytes | Evidence,
        policy: AttestationPolicy,
        *,
        expected_nonce: bytes | None = None,
    ) -> AttestationResult:
        """Verify evidence against ``policy``; return what it proves or raise.

        Without ``expected_nonce`` the quote's extraData must be a nonce from
        :meth:`new_nonce` (consumed here).  With it, extraData must equal it; if it
        is also an outstanding nonce of this verifier it is consumed.  (To bind a
        quote to a transcript, pass ``bind_nonce(n, transcript_hash)`` here and call
        :meth:`consume_nonce(n)` yourself.)
        """
        if isinstance(evidence, Evidence):
            evidence = evidence.to_bytes()
        ev = Evidence.from_bytes(evidence)  # 1. format (QuoteFormatError)
        attest = ev.attest

        # 2. issuer and certificate
        cert = ev.certificate
        if cert is None:
            raise UnknownIssuerError("evidence carries no AK certificate")
        issuer_key = self._anchors.get(cert.issuer_key_id)
        if issuer_key is None:
            raise UnknownIssuerError(
                f"AK certificate issued by unknown issuer {cert.issuer_key_id.hex()[:16]}..."
            )
        try:
            keys.verify(issuer_key, cert.tbs(), cert.signature, "AK certificate")
        except SignatureError:
            raise CertificateError("AK certificate signature does not verify under its issuer") from None
        try:
            ak_key, attributes = keys.parse_public_area(cert.ak_public)
        except FormatError as e:
            raise CertificateError(f"AK certificate: {e}") from None
        # Only a restricted key's signature proves the TPM made the TPMS_ATTEST (it
        # refuses to sign outside data starting with TPM_GENERATED_VALUE); an unrestricted
        # key signs whatever its holder gives it.  Checked here even though an honest
        # issuer refuses such keys: the verifier does not rely on the issuer's care.
        for bit, what in ((keys.RESTRICTED, "restricted"), (keys.SIGN, "signing"),
                          (keys.FIXED_TPM, "fixedTPM")):
            if not attributes & bit:
                raise CertificateError(f"certified key is not a {what} key: it cannot attest")
        if cert.version != CERT_VERSION:
            raise CertificateError(
                "AK certificate version 1 names no parent, so the AK's Qualified Name "
                "cannot be checked: re-certify the AK"
            )
        expected_signer = cert.ak_qualified_name

        # 3. signature over the exact attest bytes, by the certified AK
        keys.verify(ak_key, ev.attest_bytes, ev.signature, "quote")
        if not hmac.compare_digest(attest.qualified_signer, expected_signer):
            raise SignatureError(
                "quote's qualifiedSigner is not the certified AK's Qualified Name "
                f"({attest.qualified_signer.hex()[:20]}... != {expected_signer.hex()[:20]}...)"
            )

        # 4. event log replay (the log is not signed: it is believed only if it
        # reproduces the signed digest)
        for event in ev.event_log:
            event.check_binding()
        bank = ev.event_log.replay()
        if not hmac.compare_digest(bank.digest(attest.selection), attest.pcr_digest):
            raise EventLogReplayError(
                f"event log does not replay to the quoted PCR digest over PCRs {attest.selection}"
            )

        # 5. freshness (consumes the nonce: only evidence authentic so far gets here)
        self._check_nonce(attest.extra_data, expected_nonce)

        # 6. policy
        approved = policy.check(ev.event_log, attest.selection)
        return AttestationResult(
            host=cert.subject,
            ak_name=cert.ak_name,
            issuer_key_id=cert.issuer_key_id,
            nonce=attest.extra_data,
            clock_info=attest.clock_info,
            selection=attest.selection,
            pcr_values={i: bank.read(i) for i in attest.selection},
            events=tuple(approved),
        )

    def _check_nonce(self, extra_data: bytes, expected: bytes | None) -> None:
        if expected is None:
            self.consume_nonce(extra_data)
            return
        if not hmac.compare_digest(extra_data, bytes(expected)):
            raise NonceMismatchError("quote's extraData is not the expected nonce")
        with self._lock:
            ours = bytes(expected) in self._outstanding or bytes(expected) in self._consumed
        if ours:
            self.consume_nonce(expected)


def require_same_boot(first: AttestationResult, second: AttestationResult) -> None:
    """Raise TpmRestartError unless two verified quotes come from the same AK and the same
    boot of its TPM: equal resetCount (no TPM Reset, i.e. no power cycle that cleared the
    PCRs) and equal restartCount (no TPM Restart or Resume) in their clockInfo.

    The counts are compared for equality only, never for order: a real TPM obfuscates
    them in quotes by keys outside the endorsement and platform hierarchies (TPM 2.0
    Part 1, "Obfuscation of clock values"), with an offset fixed per key, so only
    equality under one AK means anything.  (The model's AK, like tpm2_createak's, is in
    the endorsement hierarchy, where the counts are in clear.)
    """
    if not hmac.compare_digest(first.ak_name, second.ak_name):
        raise TpmRestartError("the two quotes were signed by different attestation keys")
    a, b = first.clock_info, second.clock_info
    if a.reset_count != b.reset_count:
        raise TpmRestartError(
            f"TPM Reset between the quotes (resetCount {a.reset_count} then {b.reset_count}): "
            "the PCRs were cleared and measured again"
        )
    if a.restart_count != b.restart_count:
        raise TpmRestartError(
            f"TPM Restart or Resume between the quotes (restartCount {a.restart_count} then "
            f"{b.restart_count})"
        )
