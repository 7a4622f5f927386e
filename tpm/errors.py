"""The exception hierarchy of the software TPM and its verifier.

Every failure that a caller may want to tell apart has its own class, and every
class derives from :class:`TpmError`, so ``except TpmError`` is the fail-closed
catch-all.  Nothing in ``tpm`` returns a "maybe" result: a check either passes
completely or raises one of these.

    TpmError
    ├── FormatError                 bytes that do not parse (bounded parser)
    │   ├── CorruptStateError       a state file in a TPM/issuer directory
    │   ├── QuoteFormatError        a quote / evidence bundle (truncated, oversized, garbage);
    │   │                           also a VerificationError
    │   └── PolicyFormatError       an attestation-policy JSON document
    ├── NoTpmStateError             no TPM has been initialised in that directory
    ├── MeasurementError            measure_vmm() was given something it cannot hash
    ├── RestrictedKeyError          the AK refused to sign data that looks TPM-generated
    ├── UnsealError                 PCR policy not satisfied, or the sealed blob is not ours
    ├── CounterError                NV counter missing, invalid, or rolled back
    └── VerificationError           the verifier rejected evidence (never partially accepted)
        ├── QuoteFormatError        (see above)
        ├── UnknownIssuerError      AK certificate from an issuer the verifier does not trust
        ├── CertificateError        AK certificate forged, or certifies a non-restricted key
        ├── SignatureError          quote signature invalid, or signer differs from the certified AK
        ├── NonceMismatchError      extraData is not the nonce the verifier expected
        │   └── ReplayError         nonce already consumed, or never issued (= StaleQuoteError)
        ├── PcrDigestMismatchError  the quoted PCR digest is not what it must be
        │   └── EventLogReplayError the event log does not replay to the quoted PCRs
        ├── PolicyViolationError    PCRs/events not approved by the policy
        └── TpmRestartError         two quotes straddle a TPM Reset/Restart (or come from two AKs)
"""

from __future__ import annotations

from pathlib import Path


class TpmError(Exception):
    """Base of every error raised by the ``tpm`` package."""


class FormatError(TpmError):
    """Bytes that do not parse: truncated, oversized, bad magic/version/tag, trailing data."""


class CorruptStateError(FormatError):
    """A persistent state file failed its size, magic, version, checksum or MAC check.

    ``path`` names the offending file so an operator knows what to restore or delete.
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"corrupt TPM state file {self.path}: {reason}")


class PolicyFormatError(FormatError):
    """An attestation policy document is malformed."""


class NoTpmStateError(TpmError):
    """The directory holds no TPM state (and the caller asked not to create one)."""


class MeasurementError(TpmError):
    """A VMM measurement input could not be hashed (missing file, non-JSON config)."""


class RestrictedKeyError(TpmError):
    """The restricted attestation key refused to sign (data begins with TPM_GENERATED_VALUE)."""


class UnsealError(TpmError):
    """Unseal refused: the PCR policy is not satisfied, or the blob was tampered with / is foreign."""


class CounterError(TpmError):
    """An NV counter operation failed (bad name, undefined counter, rollback detected)."""


class VerificationError(TpmError):
    """The verifier rejected a quote.  Subclasses say why."""


class QuoteFormatError(FormatError, VerificationError):
    """A quote or evidence bundle is malformed (truncated, oversized, wrong tags).

    Both a FormatError and a VerificationError: a verifier rejects it like any other.
    """


class UnknownIssuerError(VerificationError):
    """The AK certificate names an issuer that is not among the verifier's trust anchors."""


class CertificateError(VerificationError):
    """The AK certificate's signature is invalid or it certifies an unsuitable key."""


class SignatureError(VerificationError):
    """The quote signature does not verify under the certified AK, or the signer name differs."""


class NonceMismatchError(VerificationError):
    """The quote's extraData is not the nonce the verifier expected."""


class ReplayError(NonceMismatchError):
    """The quote's nonce was already consumed, or was never issued by this verifier."""


#: Alias: an old quote is a replayed quote.
StaleQuoteError = ReplayError


class PcrDigestMismatchError(VerificationError):
    """The quoted PCR digest does not match the digest it must have."""


class EventLogReplayError(PcrDigestMismatchError):
    """The event log does not replay to the quoted PCR digest, or an event is self-inconsistent."""


class PolicyViolationError(VerificationError):
    """The attested measurements are not approved by the policy."""


class TpmRestartError(VerificationError):
    """Two quotes that should come from one boot of one TPM do not: their resetCount or
    restartCount differ (the TPM was reset or restarted in between, so PCRs measured
    before may have been replaced), or they were signed by different AKs."""


__all__ = [
    "TpmError",
    "FormatError",
    "CorruptStateError",
    "QuoteFormatError",
    "PolicyFormatError",
    "NoTpmStateError",
    "MeasurementError",
    "RestrictedKeyError",
    "UnsealError",
    "CounterError",
    "VerificationError",
    "UnknownIssuerError",
    "CertificateError",
    "SignatureError",
    "NonceMismatchError",
    "ReplayError",
    "StaleQuoteError",
    "PcrDigestMismatchError",
    "EventLogReplayError",
    "PolicyViolationError",
    "TpmRestartError",
]
