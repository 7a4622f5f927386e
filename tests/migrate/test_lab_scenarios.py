"""``minivmm lab``: whole scenarios with real VMM processes (destination,
man in the middle or hook, source), judged on what the guests printed and
what the attacker recovered; every process gone afterwards.

The command's output is checked for two scenarios; the attacks that need a
guest running on during pre-copy (stale pages), the host attacks and the two
attacks that relay no live source run through ``migrate.lab.scenario.Lab``
(the same code the command runs) and are marked slow."""

import os
import subprocess
from pathlib import Path

import pytest

from migrate.lab.scenario import COUNT, SECRET, Lab
from minivmm import vmmproc


def _alive_in(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (the scenario's work dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd and "pytest" not in cmd:
            out.append(cmd)
    return out


def lab_command(*args, cwd):
    return subprocess.run(vmmproc.command("lab", *args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_lab_list_names_every_scenario_once(tmp_path):
    p = lab_command("--list", cwd=tmp_path)
    names = [line.split()[0] for line in p.stdout.splitlines()]
    assert p.returncode == 0
    assert names[:3] == ["eavesdrop", "tamper", "replay-record"]
    assert {"downgrade", "replay-stream", "impersonate", "toctou", "double-resume", "resume-early",
            "rollback", "rogue-vmm"} <= set(names)
    assert len(names) == len(set(names)) == 18


def test_lab_command_plain_tamper_shows_the_damage_and_stops_everything(tmp_path):
    work = tmp_path / "work"
    p = lab_command("tamper", "--plain", "--keep", str(work), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "lab tamper: change bytes of a page record (the counter's text becomes HACKED!)"
    assert "mode: PLAIN engine (no defence at all)" in lines[1]
    assert any(x.startswith("lab tamper: DAMAGE: B's console shows 'HACKED! ") for x in lines), p.stdout
    assert lines[-1].startswith("lab tamper: all processes of this scenario stopped")
    assert "HACKED! " in (work / "B.stdout").read_text()          # what B's guest printed
    assert "LAB ONLY" in p.stderr
    assert _alive_in(work) == []


def test_lab_command_secure_forge_abort_names_the_defence(tmp_path):
    work = tmp_path / "work"
    p = lab_command("forge-abort", "--keep", str(work), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "mode: secure protocol, every defence on" in out
    assert "DEFENCE FIRED" in out and "ABORT record number" in out and "failed authentication" in out
    assert f"exactly one copy ran; the counter went 1..{COUNT} without gap or repeat (A and B)" in out
    assert "DAMAGE" not in out
    assert _alive_in(work) == []


def run_lab(name, tmp_path, **kw):
    before = set(vmmproc.running())
    r = Lab(name, workdir=tmp_path / "work", out=lambda s: None, **kw).run()
    assert set(vmmproc.running()) <= before            # every process of the scenario is gone
    return r


def one_copy(r):
    seq = r["counts_a"] + r["counts_b"]
    return seq == list(range(1, COUNT + 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["replay-record", "replay-round", "drop"])
def test_plain_stale_page_attacks_damage_the_counter(tmp_path, name):
    # A stale page only does damage if the guest changed it after the copy the
    # attacker keeps.  The lab's source runs pre-copy in lockstep, the guest ROUND_TICKS
    # ticks between rounds (--round-ticks), so the counter's page always changed between
    # round 0 and the pause, on an idle or a loaded machine: the damage is certain.
    r = run_lab(name, tmp_path, plain=True)
    assert r["attacker"], "the attack never acted"
    assert r["verdict"] == "damage", (r["attacker"], r["source_failure"], r["destination_failure"])
    ca, cb = r["counts_a"], r["counts_b"]
    # B's counter goes on from the stale page's count: it repeats what A printed
    assert cb and cb[0] <= ca[-1] and cb[-1] == COUNT, (ca, cb)
    assert any("rolled-back counter" in d for d in r["damage"])


@pytest.mark.slow
def test_toctou_hook_on_and_off(tmp_path):
    r = run_lab("toctou", tmp_path / "on")
    assert "PCR 9 changed since attestation" in r["source_failure"]
    assert not r["counts_b"] and one_copy(r)
    r = run_lab("toctou", tmp_path / "off", insecure=("toctou",))
    assert r["verdict"] == "damage" and r["counts_b"] and r["counts_b"][-1] == COUNT


@pytest.mark.slow
def test_double_resume_refused_in_secure_two_copies_in_plain(tmp_path):
    r = run_lab("double-resume", tmp_path / "secure")
    assert "REFUSED: no process key here for pid 1 (keeper)" in r["source_failure"]
    assert one_copy(r)
    r = run_lab("double-resume", tmp_path / "plain", plain=True)
    assert r["counts_a"][-1] == COUNT and r["counts_b"][-1] == COUNT          # both consoles counted


@pytest.mark.slow
def test_rogue_vmm_refused_and_with_attestation_off_accepted(tmp_path):
    r = run_lab("rogue-vmm", tmp_path / "on")
    assert "measurement not approved by the policy" in r["source_failure"]
    assert not r["counts_b"] and one_copy(r)
    r = run_lab("rogue-vmm", tmp_path / "off", insecure=("attestation",))
    assert r["verdict"] == "damage" and r["counts_b"]


@pytest.mark.slow
def test_a_destination_resuming_without_commit_is_refused_at_attestation_and_two_copies_without(tmp_path):
    """B resumes as soon as it holds the whole VM (keys included), without
    waiting for COMMIT.  Only attestation stops it: the behaviour is B's
    measured configuration (PCR 10), which the policy does not approve."""
    r = run_lab("resume-early", tmp_path / "on")
    assert "attestation of the destination failed" in r["source_failure"]
    assert "PCR 10" in r["source_failure"] and "resume-without-commit" in r["source_failure"]
    assert not r["counts_b"] and one_copy(r)
    r = run_lab("resume-early", tmp_path / "off", insecure=("attestation",))
    assert r["verdict"] == "damage" and r["counts_a"][-1] == COUNT and r["counts_b"][-1] == COUNT


@pytest.mark.slow
def test_rollback_refused_by_the_host_it_left_and_rolled_back_in_plain(tmp_path):
    """An old saved state of a VM that has since migrated away, restored and
    migrated again: the secure source refuses it (its migrated-away mark names
    the generation the VM left with); the plain engine lets the counter count
    the same numbers a second time."""
    r = run_lab("rollback", tmp_path / "secure")
    assert "is marked migrated-away" in r["source_failure"] and "an older copy" in r["source_failure"]
    assert not r["counts_b"] and r["counts_a"] == list(range(1, COUNT + 1))
    r = run_lab("rollback", tmp_path / "plain", plain=True)
    assert r["verdict"] == "damage" and r["counts_a"][-1] == COUNT
    assert r["counts_b"] and r["counts_b"][0] < COUNT and r["counts_b"][-1] == COUNT    # counted again


@pytest.mark.slow
def test_replay_stream_refused_in_secure_resumed_in_plain(tmp_path):
    r = run_lab("replay-stream", tmp_path / "secure")
    assert "attestation of the source failed" in r["destination_failure"]
    assert not r["counts_b"] and one_copy(r)           # A then the first B: 1..COUNT once
    r = run_lab("replay-stream", tmp_path / "plain", plain=True)
    assert any("RESUMED the replayed" in x for x in r["attacker"])
    assert r["counts_b"] and r["counts_b"][-1] == COUNT and r["verdict"] == "damage"


@pytest.mark.slow
def test_impersonator_refused_in_secure_gets_the_secret_in_plain(tmp_path):
    r = run_lab("impersonate", tmp_path / "secure")
    assert "unknown issuer" in r["source_failure"]
    assert r["counts_a"] == list(range(1, COUNT + 1))
    r = run_lab("impersonate", tmp_path / "plain", plain=True)
    assert any("LEAKED" in x and SECRET in x for x in r["attacker"])


def test_a_console_line_split_by_the_migration_is_counted_once():
    """The guest was writing 'counter 7' when it paused: 'counter ' is on A's
    console, '7' on B's (seen in a CI run: the judge then missed 7 and saw a gap)."""
    from migrate.lab.scenario import _unfinished, counts
    a, b = "toykernel: booting\ncounter 5\ncounter 6\ncounter ", "7\ncounter 8\n"
    assert counts(a) == [5, 6] and counts(_unfinished(a) + b) == [7, 8]
    assert _unfinished("counter 6\n") == ""
