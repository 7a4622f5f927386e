"""Measuring a VMM: deterministic code manifest, canonical JSON, event-log entries."""

import hashlib
import shutil

import pytest

from tpm import EventType, SoftTpm, measure_vmm, vmm_events
from tpm.errors import MeasurementError
from tpm.measure import VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR, canonical_json, code_manifest

from tpm_testdata import CONFIG, PROTECTION


def test_manifest_is_sorted_relative_and_content_hashed(vmm_code):
    (vmm_code / "__pycache__").mkdir()
    (vmm_code / "__pycache__" / "cpu.cpython-311.pyc").write_bytes(b"junk")
    manifest = code_manifest([vmm_code])
    lines = manifest.decode().splitlines()
    assert lines[0] == "minivmm-code-manifest v1"
    names = [line.split("  ", 1)[1] for line in lines[1:]]
    assert names == ["minivmm/__init__.py", "minivmm/cpu.py", "minivmm/sub/mmu.py"]
    cpu = hashlib.sha256((vmm_code / "cpu.py").read_bytes()).hexdigest()
    assert f"{cpu}  minivmm/cpu.py" in lines


def test_manifest_does_not_depend_on_location_or_argument_order(tmp_path, vmm_code):
    copy = tmp_path / "elsewhere" / "deep" / "minivmm"
    shutil.copytree(vmm_code, copy)
    assert code_manifest([vmm_code]) == code_manifest([copy])
    files = [vmm_code / "cpu.py", vmm_code / "__init__.py"]
    assert code_manifest(files, root=vmm_code) == code_manifest(files[::-1], root=vmm_code)


def test_canonical_json():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()
    with pytest.raises(MeasurementError):
        canonical_json({"x": object()})
    with pytest.raises(MeasurementError):
        canonical_json({"x": float("nan")})


def test_measure_vmm_extends_three_pcrs_with_matching_events(tpm, vmm_code):
    events = measure_vmm(tpm, [vmm_code], CONFIG, PROTECTION)
    assert [(e.pcr, e.type) for e in events] == [
        (VMM_CODE_PCR, EventType.VMM_CODE),
        (VMM_CONFIG_PCR, EventType.VMM_CONFIG),
        (VMM_POLICY_PCR, EventType.VMM_POLICY),
    ]
    assert list(tpm.event_log()) == events
    for e in events:
        assert e.digest == hashlib.sha256(e.data).digest()
        assert tpm.read_pcr(e.pcr) == hashlib.sha256(bytes(32) + e.digest).digest()
    assert events == vmm_events([vmm_code], CONFIG, PROTECTION)  # computable off-host


def test_failed_measurement_extends_nothing(tpm, vmm_code):
    with pytest.raises(MeasurementError):
        measure_vmm(tpm, [vmm_code], {"bad": {1, 2}}, PROTECTION)
    with pytest.raises(MeasurementError):
        measure_vmm(tpm, [vmm_code / "missing.py"], CONFIG, PROTECTION)
    assert len(tpm.event_log()) == 0


def test_same_vmm_same_pcrs_after_restart(tmp_path, vmm_code):
    a = SoftTpm.open(tmp_path / "t")
    measure_vmm(a, [vmm_code], CONFIG, PROTECTION)
    before = a.pcrs()
    b = SoftTpm.open(tmp_path / "t")
    measure_vmm(b, [vmm_code], dict(reversed(list(CONFIG.items()))), PROTECTION)  # key order irrelevant
    assert b.pcrs() == before
