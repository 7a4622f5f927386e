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
    ({"08": [_entry()]}, "bad PCR index '08'"),          # would replace "8"'s entries
    ({"\u0668": [_entry()]}, "bad PCR index"),           # ARABIC-INDIC DIGIT EIGHT: int() reads 8
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


# ------------------------------------------------ issue 19i: the rest of the seeded bugs
import hashlib  # noqa: E402

from tpm.errors import PolicyViolationError  # noqa: E402
from tpm.eventlog import Event  # noqa: E402
from tpm.pcr import PcrSelection  # noqa: E402


def _event(pcr, etype, data):
    return Event(pcr, etype, hashlib.sha256(data).digest(), data)


def test_a_policy_document_is_bounded_at_one_mib():
    """docs/tpm.md: a policy document is refused above 1 MiB, before it is parsed."""
    text = json.dumps(_doc({"8": [_entry()]}))
    assert AttestationPolicy.loads(text.ljust(1 << 20)).approved(8)
    with pytest.raises(PolicyFormatError, match="too large"):
        AttestationPolicy.loads(text.ljust((1 << 20) + 1))


def test_a_policy_of_another_version_is_refused_even_if_it_parses():
    """A version-2 document may mean something this verifier does not know (say,
    entries that widen what is approved): it is refused, not read as version 1."""
    for version in (2, 0, "1", None, True, 1.0):
        with pytest.raises(PolicyFormatError, match="unsupported policy version"):
            AttestationPolicy.from_json({**_doc({"8": [_entry()]}), "version": version})


@pytest.mark.parametrize("pcrs", [[], ["8"], "8", {}, None, 8])
def test_pcrs_that_are_not_a_non_empty_object_are_refused_by_name(pcrs):
    with pytest.raises(PolicyFormatError, match="'pcrs' must be a non-empty object"):
        AttestationPolicy.from_json(_doc(pcrs))


def test_a_host_that_never_measured_one_policy_pcr_fails_even_if_another_was_measured():
    """The host measured its configuration (PCR 9) but never its code (PCR 8 stays
    zero, which proves nothing): the policy names both, so it fails."""
    code = _event(8, EventType.VMM_CODE, b"minivmm-code-manifest v2\n")
    cfg = _event(9, EventType.VMM_CONFIG, b'{"memory_mb":16}')
    policy = AttestationPolicy.from_events([code, cfg])
    with pytest.raises(PolicyViolationError, match="PCR 8 was never measured"):
        policy.check([cfg], PcrSelection([8, 9]))
    assert policy.check([code, cfg], PcrSelection([8, 9])) == [code, cfg]


def test_a_policy_does_not_change_when_the_callers_collections_do():
    """The policy copies what it approves: a list the caller changes later (or one a
    hostile plug-in keeps a reference to) cannot widen it after it was built."""
    good = hashlib.sha256(b"good").digest()
    evil = hashlib.sha256(b"evil").digest()
    entries = [(EventType.VMM_CODE, good)]
    policy = AttestationPolicy({8: entries})
    entries.append((EventType.VMM_CODE, evil))
    assert policy.approved(8) == frozenset({(EventType.VMM_CODE, good)})
    with pytest.raises(PolicyViolationError, match="unapproved measurement in PCR 8"):
        policy.check([Event(8, EventType.VMM_CODE, evil, b"")], PcrSelection([8]))


def test_from_events_takes_any_iterable_once():
    events = [_event(8, EventType.VMM_CODE, b"minivmm-code-manifest v2\n"),
              _event(9, EventType.VMM_CONFIG, b"{}")]
    assert AttestationPolicy.from_events(iter(events)) == AttestationPolicy.from_events(events)
    assert list(AttestationPolicy.from_events(iter(events)).pcrs) == [8, 9]


def test_the_notes_of_a_generated_policy_describe_each_event():
    """`minivmm-tpm policy` writes a note per approved event, for the human who reviews
    the file: the number of files a code manifest lists, else the first line of the
    event's data, at most 80 characters."""
    manifest = "minivmm-code-manifest v2\n" + "".join(f"{i:064x}  minivmm/f{i}.py\n" for i in range(3))
    long_line = "x" * 100
    events = [_event(8, EventType.VMM_CODE, manifest.encode()),
              _event(8, EventType.VMM_CODE, b"minivmm-code-manifest v2\n"),      # lists no file
              _event(9, EventType.VMM_CONFIG, b'{"memory_mb":16}'),
              _event(10, EventType.MANUAL, (long_line + "\nsecond line").encode())]
    doc = AttestationPolicy.from_events(events).to_json()["pcrs"]
    assert sorted(e["note"] for e in doc["8"]) == ["code manifest of 0 file(s)", "code manifest of 3 file(s)"]
    assert doc["9"] == [{"type": "vmm-config", "digest": events[2].digest.hex(), "note": '{"memory_mb":16}'}]
    assert doc["10"][0]["note"] == "x" * 80


def test_an_unapproved_event_is_named_with_its_note(measured, policy, verifier):
    measured.extend(8, hashlib.sha256(b"rootkit").digest(), data=b"rootkit.ko loaded by hand")
    with pytest.raises(PolicyViolationError, match=r"unapproved measurement in PCR 8: .*\(rootkit.ko loaded by hand\)"):
        verifier.verify(measured.quote(verifier.new_nonce()).to_bytes(), policy)


def test_a_policy_asked_for_a_pcr_the_log_never_touched_names_it():
    """`minivmm-tpm policy` over PCRs 8 and 11 of a host that measured only PCR 8:
    refused, naming PCR 11 (not a generic 'approves nothing')."""
    events = [_event(8, EventType.VMM_CODE, b"minivmm-code-manifest v2\n")]
    with pytest.raises(PolicyFormatError, match=r"no events to approve for PCR\(s\) \[11\]"):
        AttestationPolicy.from_events(events, pcrs=[8, 11])
