"""State files from the command line (real ``minivmm`` processes): process keys
are sealed to the host's TPM, a guest without them needs no TPM, and an old
state of a VM that has migrated away is refused by the host it left and by
its destination."""

import os
import subprocess
import sys

import pytest

from minivmm.protection import seeded_keys

from vmmproc import Vmm, serve

SEED = "state-file-seed"        # so the test knows the process keys to look for


def cli(cwd, *args, tpm="tpm"):
    env = {**os.environ, "MINIVMM_TPM_STATE": str(cwd / tpm)}
    return subprocess.run([sys.executable, "-m", "minivmm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_seals_process_keys_to_the_tpm_and_restores_only_there(tmp_path):
    state = tmp_path / "s.mvstate"
    out = cli(tmp_path, "run", "secret", "--key-seed", SEED, "--ticks", "6", "--save-state", str(state))
    assert out.returncode == 3, out.stderr
    data = state.read_bytes()
    keys = seeded_keys(SEED.encode())
    for k in (keys(32) for _ in range(4)):
        assert k not in data
    assert b'"sealed": {"blob"' in data and (tmp_path / "tpm" / "source" / "tpm-state.bin").exists()
    again = cli(tmp_path, "run", str(state), "--restore", "--ticks", "3")
    assert again.returncode == 3, again.stderr
    other = cli(tmp_path, "run", str(state), "--restore", "--ticks", "3", tpm="other-host")
    assert other.returncode == 2
    assert "sealed to a TPM and there is none at" in other.stderr, other.stderr


def test_a_guest_without_process_keys_needs_no_tpm(tmp_path):
    state = tmp_path / "c.mvstate"
    assert cli(tmp_path, "run", "counter", "--ticks", "3", "--save-state", str(state)).returncode == 3
    out = cli(tmp_path, "run", str(state), "--restore")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "tpm").exists()


@pytest.mark.slow
def test_an_old_state_of_a_vm_that_migrated_away_is_refused_by_its_host_and_destination(tmp_path):
    trust = tmp_path / "trust"
    assert cli(tmp_path, "attest-setup", "--dir", str(trust)).returncode == 0
    old = tmp_path / "old.mvstate"
    assert cli(tmp_path, "run", "counter", "--ticks", "3", "--save-state", str(old), tpm="tpm-a").returncode == 3
    b, port = serve(tmp_path, "--ticks", "2", name="b", trust=trust)
    a = Vmm("run", str(old), "--restore", "--migrate-to", f"127.0.0.1:{port}", "--after", "2", cwd=tmp_path,
            name="a", trust=trust)
    assert a.finish() == 0, a.stderr
    assert b.finish() == 3, b.stderr

    # A refuses to resume the old copy, or to migrate it again (its durable mark).
    out = cli(tmp_path, "run", str(old), "--restore", tpm="tpm-a")
    assert out.returncode == 2
    assert "marked migrated-away from this host" in out.stderr and "minivmm recover" in out.stderr
    again = Vmm("run", str(old), "--restore", "--migrate-to", f"127.0.0.1:{port}", cwd=tmp_path, name="a",
                trust=trust)
    assert again.finish() == 2 and "an older copy" in again.stderr
    # Host C never saw the VM leave; B (restarted: its TPM remembers) refuses the copy.
    b2, port = serve(tmp_path, name="b", trust=trust)
    c = Vmm("run", str(old), "--restore", "--migrate-to", f"127.0.0.1:{port}", "--after", "2", cwd=tmp_path,
            name="c", trust=trust)
    assert c.finish() == 5, c.stderr                 # not migrated: the copy ran on C
    b2.wait_for("is not newer than 1")
    b2.kill()
