"""Trust setup (``migrate/secure/setup.py``): what a VMM's configuration puts in
its protection policy (PCR 10), and what a written policy approves.

The policy is what a destination with a defence off is refused by: a field of
the configuration that did not reach it would let such a VMM attest as a
strict one.  Known answers from the module's documentation; issue 19 (its
one-line mutants had no focused test)."""

import hashlib

from migrate.measure import PROTECTION_POLICY, expected_events
from migrate.secure import trust
from migrate.secure.setup import POLICY_PCRS, certify, make_policy, protection_policy, setup, write_policy
from tpm import AttestationPolicy, Issuer, SoftTpm
from tpm.measure import VMM_CODE_PCR, VMM_POLICY_PCR


def test_each_setting_reaches_the_protection_policy():
    assert protection_policy() == {**PROTECTION_POLICY, "migration": "secure"}
    assert protection_policy(mode="plain") == {**PROTECTION_POLICY, "migration": "plain"}
    assert protection_policy(protection=False)["protection"] == "none"
    assert protection_policy(key_seed="lab")["keys"] == "seeded " + hashlib.sha256(b"lab").hexdigest()
    assert protection_policy(insecure=("toctou", "replay", "toctou"))["insecure"] == ["replay", "toctou"]
    assert protection_policy(behaviour=("b", "a", "b"))["behaviour"] == ["a", "b"]
    # the defaults add nothing else, and the shared default is never changed
    assert set(protection_policy(insecure=(), behaviour=(), key_seed=None)) == set(PROTECTION_POLICY)
    assert PROTECTION_POLICY["migration"] == "plain"


def _pcr10(**kw):
    return AttestationPolicy.from_events(expected_events({}, protection_policy(**kw)),
                                         POLICY_PCRS).approved(VMM_POLICY_PCR)


def test_a_policy_approves_exactly_the_configurations_it_names():
    assert POLICY_PCRS == (VMM_CODE_PCR, VMM_POLICY_PCR)
    one = make_policy()
    assert one.approved(VMM_POLICY_PCR) == _pcr10()
    assert one.approved(VMM_CODE_PCR)                     # this build's code manifest
    two = make_policy(({}, {"insecure": ("toctou",)}))
    assert two.approved(VMM_POLICY_PCR) == _pcr10() | _pcr10(insecure=("toctou",))
    assert _pcr10(insecure=("toctou",)) - _pcr10()       # a defence off is another measurement
    assert two.approved(VMM_CODE_PCR) == one.approved(VMM_CODE_PCR)


def test_a_written_policy_is_whole_and_names_its_issuer(tmp_path):
    key = Issuer.create(tmp_path / "issuer").public_key
    path = write_policy(tmp_path / "new" / "dir" / "policy.json", ({},), key)
    assert path == tmp_path / "new" / "dir" / "policy.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["policy.json"]     # no .tmp left
    assert AttestationPolicy.load(path) == trust.approve(make_policy(), key)
    assert AttestationPolicy.load(path) != make_policy()
    write_policy(str(path), ({}, {"protection": False}), key)                 # replaced in place
    assert AttestationPolicy.load(path) == trust.approve(make_policy(({}, {"protection": False})), key)


def test_setup_makes_the_issuer_once_and_certify_uses_it(tmp_path):
    issuer, policy = setup(tmp_path)
    assert (issuer, policy) == (tmp_path / "issuer", tmp_path / "policy.json")
    key = Issuer.load(issuer).public_key
    assert AttestationPolicy.load(policy) == trust.approve(make_policy(), key)
    assert setup(tmp_path)[0] == issuer and Issuer.load(issuer).public_key.public_numbers() == key.public_numbers()
    certify(tmp_path / "tpm", issuer)
    cert = SoftTpm.open(tmp_path / "tpm", startup=None, create=False).ak_certificate
    assert cert is not None


def test_setup_takes_its_directory_as_a_string_too(tmp_path):
    """``minivmm attest-setup --dir`` hands ``setup`` a Path, a script may hand it a
    str: the same issuer and policy either way (issue 19: ``base = Path(base)``
    dropped passed every test, and a str then failed at ``base / "issuer"``)."""
    issuer, policy = setup(str(tmp_path / "trust"))
    assert (issuer, policy) == (tmp_path / "trust" / "issuer", tmp_path / "trust" / "policy.json")
    key = Issuer.load(issuer).public_key
    assert AttestationPolicy.load(policy) == trust.approve(make_policy(), key)
