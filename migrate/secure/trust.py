"""The VMM's own trust settings, measured (hostile review F2).

What a VMM trusts -- the issuer of AK certificates (``--issuer``) and the
policy of approved measurements (``--attest-policy``) -- decides which peers
it hands a VM to or takes one from.  Unmeasured, a destination that trusts a
rogue issuer or approves peers with defences off quotes the same PCRs as a
strict one, and a strict source accepts it.  So a secure VMM extends PCR 10
at start with one more event, of type ``vmm-trust``::

    data = canonical JSON {"issuer": <key id of the issuer's public key, hex>,
                           "policy": <core digest of the policy, hex>}

and a policy made by ``minivmm attest-setup`` approves exactly that event.

The policy cannot contain a hash of itself.  Its **core** is everything it
approves except its ``vmm-trust`` entries (the PCR 8 code and PCR 10
configuration events: all that decides which peers pass), and the core
digest is SHA-256 of the core's canonical JSON.  The ``vmm-trust`` entries
are pinned instead by a rule every VMM checks on its own policy at start
(:func:`measure`): the policy approves **exactly one** trust event, the one of
this issuer and this core, or the VMM refuses to start.  So a VMM's policy
cannot also approve peers with other trust settings, which its core digest
would not show -- and the check itself is code measured into PCR 8.

The issuer and the policy are read again at each handshake
(``Attestor.verify``); if they no longer give the measured event the
handshake fails (:func:`check_unchanged`): a VMM never judges peers by
settings other than those it attested to.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tpm import AttestationPolicy, EventType, SoftTpm
from tpm.eventlog import Event
from tpm.issuer import key_id
from tpm.measure import VMM_POLICY_PCR, canonical_json

from migrate.secure.errors import AttestationFailed

TRUST_PCR = VMM_POLICY_PCR          # beside the protection policy: both say what the VMM accepts


def core_digest(policy: AttestationPolicy) -> bytes:
    """SHA-256 over what ``policy`` approves, its ``vmm-trust`` entries left out
    (notes, which are ignored when judging, are left out too)."""
    pcrs = {}
    for pcr in policy.pcrs:
        kept = sorted((int(t), d.hex()) for t, d in policy.approved(pcr) if t != EventType.VMM_TRUST)
        if kept:
            pcrs[str(pcr)] = kept
    return hashlib.sha256(canonical_json({"minivmm-policy-core": 1, "pcrs": pcrs}, "policy core")).digest()


def trust_event(issuer_key, policy: AttestationPolicy) -> Event:
    data = canonical_json({"issuer": key_id(issuer_key).hex(), "policy": core_digest(policy).hex()},
                          "trust settings")
    return Event(TRUST_PCR, EventType.VMM_TRUST, hashlib.sha256(data).digest(), data)


def approve(policy: AttestationPolicy, issuer_key) -> AttestationPolicy:
    """``policy`` plus the one trust event of (``issuer_key``, its own core)."""
    return policy.merge(AttestationPolicy.from_events([trust_event(issuer_key, policy)]))


def _load(issuer_path, policy_path):
    from migrate.secure.attest import load_anchor, load_policy
    return load_anchor(issuer_path), load_policy(policy_path)


def measure(tpm_dir: Path | str, issuer_path: Path | str, policy_path: Path | str) -> Event:
    """At start: check that the policy approves exactly this VMM's own trust
    event, then extend PCR 10 with it.  ``ValueError`` (a usage error: the VMM
    does not start) if the files are unreadable or the policy does not fit."""
    try:
        key, policy = _load(issuer_path, policy_path)
    except AttestationFailed as exc:
        raise ValueError(str(exc)) from None
    event = trust_event(key, policy)
    approved = {d for t, d in policy.approved(TRUST_PCR) if t == EventType.VMM_TRUST}
    if approved != {event.digest}:
        why = ("approves no trust settings" if not approved else
               "does not approve this issuer with this policy" if event.digest not in approved else
               f"also approves {len(approved) - 1} other trust setting(s)")
        raise ValueError(f"the attestation policy {policy_path} {why}: a secure VMM measures its issuer "
                         f"and policy into PCR 10, and its policy must approve exactly those (make it "
                         f"with 'minivmm attest-setup', which writes them in)")
    SoftTpm.open(tpm_dir, startup=None).extend(TRUST_PCR, event.digest, event_type=event.type, data=event.data)
    return event


def check_unchanged(measured: bytes, issuer_key, policy: AttestationPolicy) -> None:
    """Fail closed if the issuer or policy read now is not what was measured at start."""
    if trust_event(issuer_key, policy).digest != measured:
        raise AttestationFailed("this VMM's trust settings (--issuer, --attest-policy) changed since it "
                                "measured them at start: restart it to attest the new ones")


def describe(event: Event) -> str:
    import json
    doc = json.loads(event.data)
    return (f"measured trust settings into PCR 10: issuer {doc['issuer'][:16]}..., "
            f"policy core {doc['policy'][:16]}...")
