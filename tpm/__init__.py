"""minivmm's software TPM and remote-attestation verifier.

Host side::

    from tpm import Issuer, SoftTpm, measure_vmm
    issuer = Issuer.open("issuer-dir")                  # instructor's privacy CA
    tpm = SoftTpm.open("host-a/tpm", issuer=issuer)    # created on first use
    measure_vmm(tpm, [Path("minivmm")], config, protection_policy)
    evidence = tpm.quote(nonce)                          # -> Evidence; .to_bytes()

Verifier side (never imports the TPM)::

    from tpm import AttestationPolicy, Verifier
    v = Verifier([issuer.public_key])                    # or the issuer.pub.pem path
    nonce = v.new_nonce()
    result = v.verify(evidence_bytes, policy)            # raises a VerificationError

See docs/tpm.md for byte layouts, state files and the error list.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .eventlog import Event, EventLog, EventType
from .evidence import Evidence
from .issuer import AkCertificate, Issuer, load_trust_anchor
from .measure import VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_PCRS, VMM_POLICY_PCR, measure_vmm, vmm_events
from .pcr import PcrBank, PcrSelection, extend_value, pcr_digest
from .policy import AttestationPolicy
from .quote import Attest, ClockInfo, bind_nonce
from .seal import policy_pcr_digest
from .softtpm import SoftTpm
from .verifier import AttestationResult, Verifier, require_same_boot

__all__ = [
    *_errors_all,
    "AkCertificate",
    "Attest",
    "AttestationPolicy",
    "AttestationResult",
    "ClockInfo",
    "Event",
    "EventLog",
    "EventType",
    "Evidence",
    "Issuer",
    "PcrBank",
    "PcrSelection",
    "SoftTpm",
    "VMM_CODE_PCR",
    "VMM_CONFIG_PCR",
    "VMM_PCRS",
    "VMM_POLICY_PCR",
    "Verifier",
    "bind_nonce",
    "extend_value",
    "load_trust_anchor",
    "measure_vmm",
    "pcr_digest",
    "policy_pcr_digest",
    "require_same_boot",
    "vmm_events",
]
