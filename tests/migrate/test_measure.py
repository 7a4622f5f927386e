"""Issue 4 point 2: a VMM that starts to serve or migrate measures itself."""

import subprocess
import sys

import pytest

from migrate.measure import PROTECTION_POLICY, code_paths, measure_start
from tpm import AttestationPolicy, Issuer, SoftTpm, Verifier, vmm_events
from tpm.errors import PolicyViolationError
from tpm.eventlog import EventType
from tpm.measure import canonical_json

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
    approved = AttestationPolicy.from_events(vmm_events(code_paths(), CONFIG, PROTECTION_POLICY))
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
