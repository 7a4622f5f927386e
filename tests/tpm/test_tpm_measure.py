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
    assert lines[0] == "minivmm-code-manifest v2"
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


def test_native_libraries_follow_the_package_files_in_the_given_order(tmp_path, vmm_code):
    a, b = tmp_path / "liba.so", tmp_path / "libb.so"
    a.write_bytes(b"\x7fELF a")
    b.write_bytes(b"\x7fELF b")
    manifest = code_manifest([vmm_code], native_libraries=[("emu/liba.so", a), ("asm/libb.so", b)])
    lines = manifest.decode().splitlines()
    assert lines[1:4] == [line for line in code_manifest([vmm_code]).decode().splitlines()[1:]]
    ha, hb = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b))
    assert lines[4:] == [f"{ha}  native:emu/liba.so", f"{hb}  native:asm/libb.so"]
    swapped = code_manifest([vmm_code], native_libraries=[("asm/libb.so", b), ("emu/liba.so", a)])
    assert swapped != manifest  # the order is part of the measurement


def test_a_changed_native_library_changes_pcr8(tmp_path, vmm_code):
    lib = tmp_path / "libemu.so"
    lib.write_bytes(b"\x7fELF version 1")
    before = vmm_events([vmm_code], CONFIG, PROTECTION, native_libraries=[("emu", lib)])
    lib.write_bytes(b"\x7fELF version 2")
    after = vmm_events([vmm_code], CONFIG, PROTECTION, native_libraries=[("emu", lib)])
    assert before[0].digest != after[0].digest
    assert before[1:] == after[1:]


@pytest.mark.parametrize("natives,message", [
    ([("emu", "/nonexistent/lib.so")], "not a file"),
    ([("", __file__)], "label"),
    ([("x", __file__), ("x", __file__)], "repeated"),
    ([("a\nb", __file__)], "label"),
])
def test_bad_native_library_entries_are_refused(vmm_code, natives, message):
    with pytest.raises(MeasurementError, match=message):
        code_manifest([vmm_code], native_libraries=natives)


def test_a_package_file_cannot_pose_as_a_native_library(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "native:unicorn").write_text("x")
    with pytest.raises(MeasurementError, match="reserved"):
        code_manifest([root / "native:unicorn"], root=root)


def test_manifest_names_do_not_depend_on_packages_living_apart(tmp_path, vmm_code):
    """A checkout's package imported beside an installed one (python -m from a
    checkout) must measure like both in one place: names are relative to each
    package's own parent, never to a common root such as '/'."""
    together = tmp_path / "together"
    shutil.copytree(vmm_code, together / "minivmm")
    shutil.copytree(vmm_code, together / "tpm")
    apart_a = tmp_path / "a" / "deep" / "minivmm"
    apart_b = tmp_path / "b" / "tpm"
    shutil.copytree(vmm_code, apart_a)
    shutil.copytree(vmm_code, apart_b)
    assert code_manifest([together / "minivmm", together / "tpm"]) == code_manifest([apart_a, apart_b])
    assert "tmp" not in code_manifest([apart_a, apart_b]).decode()


def test_two_packages_of_one_name_are_refused(tmp_path, vmm_code):
    other = tmp_path / "x" / "minivmm"
    shutil.copytree(vmm_code, other)
    with pytest.raises(MeasurementError, match="both named"):
        code_manifest([vmm_code, other])


def test_a_mutation_tools_bookkeeping_beside_a_module_is_not_code_but_anything_else_is(vmm_code):
    """mutmut writes ``X.py.meta`` and ``X.py.spans`` beside each module it mutated; Python
    never imports them, and measured they pushed the manifest past its event bound (the
    documented ``mutmut run`` failed).  Only those, beside their module, are left out:
    the same names without the module, or a native extension dropped beside the sources
    (which Python would import before the ``.py``), are measured."""
    before = code_manifest([vmm_code])
    (vmm_code / "cpu.py.meta").write_text("{}")
    (vmm_code / "cpu.py.spans").write_text("{}")
    assert code_manifest([vmm_code]) == before
    for stray in ("mmu.py.meta", "cpu.cpython-311-x86_64-linux-gnu.so", "cpu.meta", "cpu.py.orig"):
        (vmm_code / stray).write_bytes(b"x")
        assert f"  minivmm/{stray}\n".encode() in code_manifest([vmm_code]), stray
        (vmm_code / stray).unlink()


@pytest.mark.parametrize("plant", ["sourceless package", "sourceless module", "linked package"])
def test_code_python_would_import_but_the_walk_would_not_see_is_refused(tmp_path, vmm_code, plant):
    """A hostile writer of the install directory shadows the measured ``cpu.py``
    with a package directory holding only ``__init__.pyc`` (Python looks for the
    package first; the walk skipped every ``.pyc``), with a ``.pyc`` beside the
    sources, or with a symbolic link to a directory elsewhere (``os.walk`` does not
    follow it; the import system does).  Each was imported while PCR 8 stayed the
    same (a review of this session); each is now refused by name."""
    if plant == "sourceless package":
        (vmm_code / "cpu").mkdir()
        (vmm_code / "cpu" / "__init__.pyc").write_bytes(b"evil")
        named = "__init__.pyc"
    elif plant == "sourceless module":
        (vmm_code / "net.pyc").write_bytes(b"evil")
        named = "net.pyc"
    else:
        (tmp_path / "evil").mkdir()
        (tmp_path / "evil" / "__init__.py").write_text("print('unmeasured')\n")
        (vmm_code / "cpu_impl").symlink_to(tmp_path / "evil", target_is_directory=True)
        named = "cpu_impl: a symbolic link"
    with pytest.raises(MeasurementError, match=named):
        code_manifest([vmm_code])
