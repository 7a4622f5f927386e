"""Attestation policy documents."""

import json

import pytest

from tpm import AttestationPolicy, EventType
from tpm.errors import PolicyFormatError


def test_json_round_trip(measured, policy, tmp_path):
    doc = policy.to_json()
    assert doc["format"] == "minivmm-attestation-policy" and doc["version"] == 1
    assert list(doc["pcrs"]) == ["8", "9", "10"]
    assert AttestationPolicy.from_json(json.loads(json.dumps(doc))) == policy
    path = tmp_path / "p.json"
    path.write_text(policy.dumps())
    assert AttestationPolicy.load(path) == policy


def test_merge_approves_both(measured, policy):
    other = AttestationPolicy({8: [(EventType.VMM_CODE, b"\x11" * 32)]})
    merged = policy.merge(other)
    assert (EventType.VMM_CODE, b"\x11" * 32) in merged.approved(8)
    assert merged.approved(9) == policy.approved(9)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"format": "x", "version": 1, "pcrs": {"8": [{"type": "vmm-code", "digest": "00" * 32}]}},
        {"format": "minivmm-attestation-policy", "version": 2, "pcrs": {}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {"24": [{"type": "vmm-code", "digest": "00" * 32}]}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {"8": []}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {"8": [{"type": "nope", "digest": "00" * 32}]}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {"8": [{"type": "vmm-code", "digest": "00"}]}},
        {"format": "minivmm-attestation-policy", "version": 1, "pcrs": {"8": [{"type": "vmm-code", "digest": "zz" * 32}]}},
    ],
)
def test_malformed_policies(doc):
    with pytest.raises(PolicyFormatError):
        AttestationPolicy.from_json(doc)


def test_not_json():
    with pytest.raises(PolicyFormatError):
        AttestationPolicy.loads("{not json")
