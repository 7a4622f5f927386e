"""Issue 4 point 2: a VMM that starts to serve or migrate measures itself."""

import subprocess
import sys

import pytest

import hashlib
import shutil

from migrate.measure import (NATIVE_MODULES, PROTECTION_POLICY, code_paths, expected_events, measure_start,
                             native_libraries)
from tpm import AttestationPolicy, Issuer, SoftTpm, Verifier, vmm_events
from tpm.errors import PolicyViolationError
from tpm.eventlog import EventType
from tpm.measure import canonical_json, code_manifest

CONFIG = {"role": "destination", "migration_protocol": 1, "secure": False, "timeout": 10.0}


def test_start_measures_code_config_policy_with_replaying_log(tmp_path):
    m = measure_start(tmp_path / "tpm", CONFIG)
    tpm = SoftTpm.open(tmp_path / "tpm", startup=None)
    log = tpm.event_log()
    assert [(e.pcr, e.type) for e in log] == [(8, EventType.VMM_CODE), (9, EventType.VMM_CONFIG),
                                              (10, EventType.VMM_POLICY)]
    assert log[1].data == canonical_json(CONFIG) and log[2].data == canonical_json(PROTECTION_POLICY)
    assert b"migrate/source.py" in log[0].data and b"minivmm/machine.py" in log[0].data
    bank = log.replay()
    assert all(bank.read(i) == tpm.read_pcr(i) for i in range(24))
    assert {i: tpm.read_pcr(i).hex() for i in (8, 9, 10)} == m.pcrs
    # a restart is a fresh measured boot: same VMM, same PCRs
    assert measure_start(tmp_path / "tpm", CONFIG).pcrs == m.pcrs


def test_a_different_configuration_changes_pcr9_and_the_quote(tmp_path):
    issuer = Issuer.open(tmp_path / "issuer")
    a = measure_start(tmp_path / "a", CONFIG)
    b = measure_start(tmp_path / "b", {**CONFIG, "timeout": 5.0})
    assert a.pcrs[8] == b.pcrs[8] and a.pcrs[10] == b.pcrs[10]
    assert a.pcrs[9] != b.pcrs[9]
    unprotected = measure_start(tmp_path / "c", CONFIG, {**PROTECTION_POLICY, "protection": "none"})
    assert unprotected.pcrs[10] != a.pcrs[10] and unprotected.pcrs[9] == a.pcrs[9]
    # a verifier that approved configuration A refuses a quote from B
    approved = AttestationPolicy.from_events(expected_events(CONFIG))
    verifier = Verifier([issuer.public_key])
    for name, ok in (("a", True), ("b", False)):
        tpm = SoftTpm.open(tmp_path / name, issuer=issuer, startup=None)
        nonce = verifier.new_nonce()
        evidence = tpm.quote(nonce).to_bytes()
        if ok:
            verifier.verify(evidence, approved, expected_nonce=nonce)
        else:
            with pytest.raises(PolicyViolationError):
                verifier.verify(evidence, approved, expected_nonce=nonce)


@pytest.mark.slow
def test_serve_process_measures_itself_at_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minivmm", "serve", "--listen", "256.0.0.1:1", "--timeout", "3",
                           "--tpm-dir", str(tmp_path / "t")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # the bad address fails after the measurement, which must already be in the TPM
    assert proc.returncode == 2 and "measured into TPM" in proc.stderr
    tpm = SoftTpm.open(tmp_path / "t", startup=None)
    assert len(tpm.event_log()) == 3 and b'"role":"destination"' in tpm.event_log()[1].data


def test_a_key_seed_is_visible_in_the_measured_policy(tmp_path):
    from argparse import Namespace
    from migrate.cli import _measure
    base = dict(timeout=10.0, migrate_to=None, no_protection=False, plain=True)
    plain = _measure("destination", Namespace(tpm_dir=str(tmp_path / "a"), key_seed=None, **base))
    seeded = _measure("destination", Namespace(tpm_dir=str(tmp_path / "b"), key_seed="public", **base))
    assert plain.pcrs[9] == seeded.pcrs[9] and plain.pcrs[10] != seeded.pcrs[10]
    assert seeded.policy["keys"].startswith("seeded ") and "public" not in seeded.policy["keys"]


def test_code_measurement_covers_the_native_libraries_the_process_loaded(tmp_path):
    """Issue 11 item 3: PCR 8's manifest ends with the emulator's, assembler's, disassembler's
    and AEAD's shared objects, in the documented order, each hashed from the file mapped in
    this very process."""
    measure_start(tmp_path / "tpm", CONFIG)
    manifest = SoftTpm.open(tmp_path / "tpm", startup=None).event_log()[0].data.decode()
    native = [line for line in manifest.splitlines() if "  native:" in line]
    assert [line.split("  native:")[1].split("/")[0] for line in native] == [m for m, _ in NATIVE_MODULES]
    assert manifest.splitlines()[-len(native):] == native  # after every package file
    maps = open("/proc/self/maps").read()
    for line, (label, path) in zip(native, native_libraries()):
        assert line == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  native:{label}"
        assert str(path) in maps and ".so" in path.name
    assert any(label.startswith("unicorn/libunicorn.so") for label, _ in native_libraries())


def test_a_changed_emulator_library_changes_pcr8(tmp_path):
    """Replace libunicorn by a copy with one byte changed: PCR 8 changes, 9 and 10 do not."""
    libs = native_libraries()
    label, path = libs[0]
    changed = tmp_path / path.name
    shutil.copyfile(path, changed)
    raw = bytearray(changed.read_bytes())
    raw[len(raw) // 2] ^= 1
    changed.write_bytes(bytes(raw))
    honest = vmm_events(code_paths(), CONFIG, PROTECTION_POLICY, native_libraries=libs)
    patched = vmm_events(code_paths(), CONFIG, PROTECTION_POLICY,
                         native_libraries=[(label, changed)] + libs[1:])
    assert honest == expected_events(CONFIG)
    assert patched[0].digest != honest[0].digest and patched[1:] == honest[1:]


def test_the_tui_the_cli_loads_is_measured_without_being_imported():
    """The CLI loads ``tui.cli:register`` through its entry point at every start
    (``serve`` included), so a changed ``tui/`` must change PCR 8 (a hostile review
    changed it and PCR 8 stayed the same); finding it must not import it (the VMM
    core never imports the TUI or Textual)."""
    probe = ("import sys; from migrate.measure import code_paths; "
             "names = [p.name for p in code_paths()]; "
             "print(names, 'tui' in sys.modules, 'textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['minivmm', 'guests', 'migrate', 'tpm', 'tui', 'minivmm_boot.py'] False False", out
    manifest = code_manifest(code_paths())
    assert b"  tui/cli.py\n" in manifest
