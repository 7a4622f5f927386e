"""What a VMM trusts is measured (hostile review F2): a destination started with
another issuer or a more permissive policy no longer attests as the strict
one, and a VMM refuses to start with a policy that does not approve exactly
its own trust settings."""

import pytest

from migrate.measure import measure_start
from migrate.secure import trust
from migrate.secure.attest import Attestor
from migrate.secure.errors import AttestationFailed
from migrate.secure.mode import SecureMode
from migrate.secure.setup import certify, make_policy, protection_policy, write_policy
from tpm import AttestationPolicy, Issuer

from securehelp import Trust
from test_secure_attacks import assert_home_intact, guest, migrate


def destination(tmp_path, strict: Trust, issuer, policy):
    """Host b: the approved build and configuration, AK certified by the strict
    issuer, started with ``issuer`` and ``policy`` as its trust settings."""
    b = tmp_path / "b"
    measure_start(b, {"role": "destination"}, protection_policy())
    certify(b, strict.issuer)
    trust.measure(b, issuer, policy)
    return lambda: SecureMode(Attestor(b, issuer, policy))


def refused_for_its_trust(strict, factory):
    a = strict.host("a")
    m = guest()
    keys = dict(m.protection._keys)
    m, res = migrate(strict, strict.mode(a), factory, m)
    err = res["source_error"]
    assert isinstance(err, AttestationFailed), res
    assert "attestation of the destination failed: measurement not approved by the policy" in str(err)
    assert "PCR 10: vmm-trust" in str(err)
    assert_home_intact(m, keys, res)


def test_a_destination_with_a_more_permissive_policy_is_refused(tmp_path):
    strict = Trust(tmp_path / "trust")
    permissive = write_policy(tmp_path / "permissive.json", ({}, {"insecure": ("toctou",)}),
                              Issuer.load(strict.issuer).public_key)
    refused_for_its_trust(strict, destination(tmp_path, strict, strict.issuer, permissive))


def test_a_destination_trusting_a_rogue_issuer_is_refused(tmp_path):
    strict = Trust(tmp_path / "trust")
    rogue = Issuer.create(tmp_path / "rogue")
    rogue_policy = write_policy(tmp_path / "rogue.json", ({},), rogue.public_key)   # same approvals
    refused_for_its_trust(strict, destination(tmp_path, strict, tmp_path / "rogue", rogue_policy))


def test_the_same_trust_settings_pass(tmp_path):
    strict = Trust(tmp_path / "trust")
    a = strict.host("a")
    m, res = migrate(strict, strict.mode(a), destination(tmp_path, strict, strict.issuer, strict.policy))
    assert res["report"].outcome == "completed", res


def test_a_vmm_refuses_to_start_with_a_policy_that_does_not_approve_exactly_its_trust(tmp_path):
    strict = Trust(tmp_path / "trust")
    key = Issuer.load(strict.issuer).public_key
    measure_start(tmp_path / "h", {"role": "destination"}, protection_policy())
    core = tmp_path / "core.json"                    # e.g. from minivmm-tpm policy: no trust event
    core.write_text(make_policy().dumps())
    with pytest.raises(ValueError, match="approves no trust settings"):
        trust.measure(tmp_path / "h", strict.issuer, core)
    rogue = Issuer.create(tmp_path / "rogue").public_key
    both = tmp_path / "both.json"                    # its own trust, and a rogue issuer's too
    both.write_text(trust.approve(make_policy(), key).merge(trust.approve(make_policy(), rogue)).dumps())
    with pytest.raises(ValueError, match="also approves 1 other trust setting"):
        trust.measure(tmp_path / "h", strict.issuer, both)
    with pytest.raises(ValueError, match="does not approve this issuer"):
        trust.measure(tmp_path / "h", tmp_path / "rogue", strict.policy)


def test_trust_settings_changed_after_start_fail_the_next_handshake(tmp_path):
    strict = Trust(tmp_path / "trust")
    a = strict.host("a")
    own = tmp_path / "b-policy.json"                 # b's copy of the policy, measured at its start
    own.write_bytes(strict.policy.read_bytes())
    factory = destination(tmp_path, strict, strict.issuer, own)
    measured = trust.trust_event(Issuer.load(strict.issuer).public_key, AttestationPolicy.load(own)).digest
    write_policy(own, ({}, {"insecure": ("toctou",)}), Issuer.load(strict.issuer).public_key)
    m, res = migrate(strict, strict.mode(a), lambda: SecureMode(Attestor(
        factory().attestor.tpm_dir, strict.issuer, own, trust=measured)))
    assert isinstance(res["error"], AttestationFailed)
    assert "trust settings (--issuer, --attest-policy) changed since it measured them" in str(res["error"])
    assert m.halted is None


# ------------------------------------------------ the trust event, byte by byte
def test_the_core_digest_is_the_documented_one():
    """docs/protocol.md: SHA-256 of the canonical JSON ``{"minivmm-policy-core": 1,
    "pcrs": {"<pcr>": [[type, "digest hex"], ...]}}``, the pairs sorted, the
    ``vmm-trust`` entries (and PCRs left with nothing) out.  Built from fixed
    events, so the answer does not depend on this build's code."""
    import hashlib
    import json
    from tpm import EventType
    from tpm.eventlog import Event
    code = Event(8, EventType.VMM_CODE, b"\x08" * 32, b"code")
    config = Event(9, EventType.VMM_CONFIG, b"\x09" * 32, b"config")
    config2 = Event(9, EventType.VMM_CONFIG, b"\x01" * 32, b"config 2")
    only_trust = Event(10, EventType.VMM_TRUST, b"\x0a" * 32, b"trust")
    policy = AttestationPolicy.from_events([code, config, config2, only_trust])
    core = {"minivmm-policy-core": 1, "pcrs": {
        "8": [[int(EventType.VMM_CODE), "08" * 32]],
        "9": [[int(EventType.VMM_CONFIG), "01" * 32], [int(EventType.VMM_CONFIG), "09" * 32]]}}
    want = hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert trust.core_digest(policy) == want
    # the trust entries are not part of the core: approving one more leaves it
    assert trust.core_digest(policy.merge(AttestationPolicy.from_events(
        [Event(10, EventType.VMM_TRUST, b"\x0b" * 32, b"t")]))) == want


def test_measure_extends_pcr_10_with_the_event_it_returns_and_describes(tmp_path):
    from tpm import Issuer, SoftTpm
    from tpm.issuer import key_id
    strict = Trust(tmp_path / "trust")
    measure_start(tmp_path / "h", {"role": "source"}, protection_policy())
    key = Issuer.load(strict.issuer).public_key
    event = trust.measure(tmp_path / "h", strict.issuer, strict.policy)
    assert event == trust.trust_event(key, AttestationPolicy.load(strict.policy))
    last = list(SoftTpm.open(tmp_path / "h", startup=None).event_log())[-1]
    assert (last.pcr, last.type, last.digest, last.data) == (10, event.type, event.digest, event.data)
    core = trust.core_digest(AttestationPolicy.load(strict.policy)).hex()
    assert trust.describe(event) == (f"measured trust settings into PCR 10: issuer {key_id(key).hex()[:16]}..., "
                                     f"policy core {core[:16]}...")


def test_a_vmm_with_an_unreadable_issuer_or_policy_does_not_start(tmp_path):
    """A usage error (``ValueError``: the VMM does not start), naming the file;
    and nothing is measured."""
    from tpm import SoftTpm
    strict = Trust(tmp_path / "trust")
    measure_start(tmp_path / "h", {"role": "source"}, protection_policy())
    before = len(SoftTpm.open(tmp_path / "h", startup=None).event_log())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the trusted issuer from .*nowhere"):
        trust.measure(tmp_path / "h", tmp_path / "nowhere", strict.policy)
    with pytest.raises(ValueError, match="cannot load the attestation policy .*bad.json"):
        trust.measure(tmp_path / "h", strict.issuer, bad)
    assert len(SoftTpm.open(tmp_path / "h", startup=None).event_log()) == before
