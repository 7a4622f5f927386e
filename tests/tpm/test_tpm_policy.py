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


# ------------------------------------------------ bounds and checks (seeded bugs)
def _doc(pcrs):
    return {"format": "minivmm-attestation-policy", "version": 1, "pcrs": pcrs}


def _entry(digest="00" * 32, **kw):
    return {"type": "vmm-code", "digest": digest, **kw}


@pytest.mark.parametrize("pcrs, message", [
    ({"24": [_entry()]}, "bad PCR index '24'"),
    ({"-1": [_entry()]}, "bad PCR index '-1'"),
    ({"8.0": [_entry()]}, "bad PCR index"),
    ({"8": []}, "expected a list of 1..256 entries"),
    ({"8": [_entry(f"{i:064x}") for i in range(257)]}, "expected a list of 1..256 entries"),
    ({"8": {"type": "vmm-code"}}, "expected a list"),
    ({"8": ["vmm-code"]}, "entries must be objects"),
    ({"8": [_entry(type="nope")]}, "unknown event type 'nope'"),
    ({"8": [_entry("00" * 31)]}, "digest must be 64 hex digits"),
    ({"8": [_entry("00" * 33)]}, "digest must be 64 hex digits"),
    ({"8": [_entry(None)]}, "digest must be 64 hex digits"),
    ({"8": [_entry("zz" * 32)]}, "digest must be 64 hex digits"),
    ([], "'pcrs' must be a non-empty object"),
])
def test_each_malformed_policy_names_its_fault(pcrs, message):
    with pytest.raises(PolicyFormatError, match=message):
        AttestationPolicy.from_json(_doc(pcrs))


def test_policy_bounds_at_their_edges_are_accepted():
    p = AttestationPolicy.from_json(_doc({"23": [_entry(f"{i:064x}", note="n") for i in range(256)],
                                          "0": [_entry(note=7)]}))
    assert len(p.approved(23)) == 256 and list(p.pcrs) == [0, 23]
    assert p.approved(5) == frozenset()                        # an unnamed PCR approves nothing
    assert p.to_json()["pcrs"]["23"][0] == {"type": "vmm-code", "digest": "00" * 32, "note": "n"}
    assert p.to_json()["pcrs"]["0"] == [{"type": "vmm-code", "digest": "00" * 32}]   # non-text note dropped


def test_policies_compare_by_what_they_approve():
    a = AttestationPolicy({8: [(EventType.VMM_CODE, b"\x01" * 32)]})
    assert a == AttestationPolicy({8: [(EventType.VMM_CODE, b"\x01" * 32)]})
    assert a != AttestationPolicy({8: [(EventType.VMM_CODE, b"\x02" * 32)]})
    assert a != AttestationPolicy({9: [(EventType.VMM_CODE, b"\x01" * 32)]})
    assert a != "policy" and a != None  # noqa: E711


def test_an_empty_policy_approves_nothing_and_is_refused():
    with pytest.raises(PolicyFormatError, match="names no PCRs"):
        AttestationPolicy({})
    with pytest.raises(PolicyFormatError, match="approves nothing for PCR 8"):
        AttestationPolicy({8: []})


def test_policy_text_is_bounded_and_must_be_json(tmp_path):
    from tpm.policy import MAX_POLICY_BYTES

    with pytest.raises(PolicyFormatError, match="too large"):
        AttestationPolicy.loads(" " * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyFormatError, match="not valid JSON"):
        AttestationPolicy.loads("{")
    with pytest.raises(PolicyFormatError, match="cannot read policy"):
        AttestationPolicy.load(tmp_path / "missing.json")
    text = json.dumps(_doc({"8": [_entry()]}))
    assert AttestationPolicy.loads(text.ljust(MAX_POLICY_BYTES)) == AttestationPolicy.from_json(_doc({"8": [_entry()]}))
    big = tmp_path / "big.json"
    big.write_text(text.ljust(MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyFormatError, match="too large"):
        AttestationPolicy.load(big)
