"""Trust setup for the secure protocol: issuer, certified TPMs, the policy.

* :func:`protection_policy` -- what a VMM measures into PCR 10: protection,
  key source, migration mode and every defence turned off (``--insecure``), so
  a policy that approves the secure configuration refuses a VMM with any
  defence off.
* :func:`make_policy` -- a policy approving this VMM build (PCR 8, its code
  manifest) in the given configurations (PCR 10).  PCR 9 (timeouts, pre-copy
  knobs, role) is quoted but not judged: it changes with harmless options.
  Computed without a TPM (``migrate.measure.expected_events``: the same code
  manifest, native libraries included, that a VMM start measures), so it can
  be written before either VMM starts.  With the issuer's key it also
  approves the trust settings (that issuer, that policy's core) a secure VMM
  measures into PCR 10 (``migrate.secure.trust``).
* :func:`certify` -- certify a host TPM's AK with a local issuer.
* :func:`setup` -- all of it in one directory (``minivmm attest-setup``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tpm import AttestationPolicy, Issuer, SoftTpm
from tpm.measure import VMM_CODE_PCR, VMM_POLICY_PCR

from migrate.measure import PROTECTION_POLICY, expected_events
from migrate.secure import trust

POLICY_PCRS = (VMM_CODE_PCR, VMM_POLICY_PCR)


def protection_policy(*, mode: str = "secure", insecure=(), protection: bool = True,
                      key_seed: str | None = None, behaviour=()) -> dict:
    policy = dict(PROTECTION_POLICY)
    policy["migration"] = mode
    if not protection:
        policy["protection"] = "none"
    if key_seed:
        # Keys derivable from a seed are a different protection: an attester
        # must be able to tell (the seed's hash, never the seed).
        policy["keys"] = "seeded " + hashlib.sha256(key_seed.encode()).hexdigest()
    if insecure:
        policy["insecure"] = sorted(set(insecure))
    if behaviour:
        # Lab hooks that change what the VMM does in the protocol (a destination
        # that resumes without COMMIT): a real VMM would need other code for that,
        # which PCR 8 would show; the hook shows here instead, where the policy looks.
        policy["behaviour"] = sorted(set(behaviour))
    return policy


def make_policy(configurations=({},), issuer_key=None) -> AttestationPolicy:
    """``configurations``: keyword sets for :func:`protection_policy` to approve.
    ``issuer_key``: also approve the trust settings (this issuer, this policy)
    that a secure VMM measures into PCR 10 (``migrate.secure.trust``)."""
    policy = None
    for kw in configurations:
        events = expected_events({}, protection_policy(**kw))
        p = AttestationPolicy.from_events(events, POLICY_PCRS)
        policy = p if policy is None else policy.merge(p)
    return policy if issuer_key is None else trust.approve(policy, issuer_key)


def write_policy(path: Path | str, configurations=({},), issuer_key=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(make_policy(configurations, issuer_key).dumps())
    tmp.replace(path)
    return path


def certify(tpm_dir: Path | str, issuer_dir: Path | str) -> None:
    """Certify the AK of the TPM in ``tpm_dir`` with the issuer in ``issuer_dir``
    (which holds the issuer's private key: a local issuer)."""
    SoftTpm.open(tpm_dir, startup=None, issuer=Issuer.load(issuer_dir))


def setup(base: Path | str, configurations=({},)) -> tuple[Path, Path]:
    """Issuer (created once) and policy under ``base``: (issuer dir, policy file)."""
    base = Path(base)
    issuer = base / "issuer"
    key = Issuer.open(issuer).public_key
    return issuer, write_policy(base / "policy.json", configurations, key)
