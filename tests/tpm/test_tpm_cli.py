"""The minivmm-tpm command line, run as ``python -m tpm`` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    ["issuer", "init"], ["issuer", "show"], ["init"], ["reset"], ["info"], ["pcrs"], ["log"],
    ["extend"], ["measure"], ["nonce"], ["quote"], ["verify"], ["policy"], ["counter"],
    ["seal"], ["unseal"], ["export"],
]


def run(*args, cwd, ok=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MINIVMM_TPM_STATE", None)
    p = subprocess.run(
        [sys.executable, "-m", "tpm", *map(str, args)], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=60,
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def assert_one_line_error(p, contains):
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert contains in lines[0], lines[0]


def test_help_for_every_command(tmp_path):
    top = run("--help", cwd=tmp_path)
    for name in ("init", "quote", "verify", "policy", "extend", "issuer"):
        assert name in top.stdout
    for cmd in COMMANDS:
        p = run(*cmd, "--help", cwd=tmp_path)
        assert p.stdout.startswith("usage: minivmm-tpm " + " ".join(cmd)), p.stdout
    assert run("quote", cwd=tmp_path, ok=False).returncode == 2  # missing arguments: usage error


def test_full_lab_flow(tmp_path):
    (tmp_path / "vmm").mkdir()
    (tmp_path / "vmm" / "core.py").write_text("print('vmm')\n")
    (tmp_path / "cfg.json").write_text(json.dumps({"memory_mb": 16}))
    (tmp_path / "prot.json").write_text(json.dumps({"cloaking": True}))

    run("issuer", "init", "ca", "--name", "lab-ca", cwd=tmp_path)
    assert "lab-ca" in run("issuer", "show", "ca", cwd=tmp_path).stdout
    out = run("init", "--state", "host-a", "--issuer", "ca", cwd=tmp_path).stdout
    assert "AK name" in out
    assert "all 24 PCRs are zero" in run("pcrs", "--state", "host-a", cwd=tmp_path).stdout

    run("measure", "--state", "host-a", "--code", "vmm", "--config", "cfg.json",
        "--policy", "prot.json", cwd=tmp_path)
    pcrs = json.loads(run("pcrs", "--state", "host-a", "--json", cwd=tmp_path).stdout)
    assert pcrs["8"] != "00" * 32 and pcrs["0"] == "00" * 32
    log = json.loads(run("log", "--state", "host-a", "--json", cwd=tmp_path).stdout)
    assert [e["type"] for e in log] == ["vmm-code", "vmm-config", "vmm-policy"]
    assert "vmm-config" in run("log", "--state", "host-a", cwd=tmp_path).stdout

    run("policy", "--state", "host-a", "--out", "approved.json", cwd=tmp_path)
    nonce = run("nonce", cwd=tmp_path).stdout.strip()
    assert len(bytes.fromhex(nonce)) == 32
    run("quote", "--state", "host-a", "--nonce", nonce, "--out", "q.bin", cwd=tmp_path)
    verify = ["verify", "--quote", "q.bin", "--policy", "approved.json", "--issuer", "ca"]
    ok = run(*verify, "--nonce", nonce, cwd=tmp_path)
    assert ok.stdout.startswith("OK: host 'host-a'")
    assert json.loads(run(*verify, "--nonce", nonce, "--json", cwd=tmp_path).stdout)["ok"] is True

    # failures: one clear line, exit 1
    assert_one_line_error(run(*verify, "--nonce", "00" * 32, cwd=tmp_path, ok=False), "NonceMismatchError")
    (tmp_path / "short.bin").write_bytes((tmp_path / "q.bin").read_bytes()[:60])
    p = run("verify", "--quote", "short.bin", "--policy", "approved.json", "--issuer", "ca",
            "--nonce", nonce, cwd=tmp_path, ok=False)
    assert_one_line_error(p, "QuoteFormatError")
    run("issuer", "init", "other-ca", cwd=tmp_path)
    p = run("verify", "--quote", "q.bin", "--policy", "approved.json", "--issuer", "other-ca",
            "--nonce", nonce, cwd=tmp_path, ok=False)
    assert_one_line_error(p, "UnknownIssuerError")

    # load something unapproved: the next quote fails the policy
    run("extend", "--state", "host-a", "--pcr", "8", "--text", "rootkit.ko", cwd=tmp_path)
    run("quote", "--state", "host-a", "--nonce", nonce, "--out", "q2.bin", cwd=tmp_path)
    p = run("verify", "--quote", "q2.bin", "--policy", "approved.json", "--issuer", "ca",
            "--nonce", nonce, cwd=tmp_path, ok=False)
    assert_one_line_error(p, "PolicyViolationError")

    # seal survives nothing but an unchanged PCR state; counters survive a reset
    (tmp_path / "secret.txt").write_text("s3cret")
    run("seal", "--state", "host-a", "--in", "secret.txt", "--out", "s.blob", cwd=tmp_path)
    assert run("unseal", "--state", "host-a", "--in", "s.blob", cwd=tmp_path).stdout == "s3cret"
    assert run("counter", "--state", "host-a", "epoch", "--increment", cwd=tmp_path).stdout.strip() == "1"
    run("reset", "--state", "host-a", cwd=tmp_path)
    assert_one_line_error(run("unseal", "--state", "host-a", "--in", "s.blob", cwd=tmp_path, ok=False), "UnsealError")
    assert run("counter", "--state", "host-a", "epoch", cwd=tmp_path).stdout.strip() == "1"
    assert "resetCount=1" in run("info", "--state", "host-a", cwd=tmp_path).stdout


def test_errors_are_one_line(tmp_path):
    assert_one_line_error(run("pcrs", "--state", "nothing-here", cwd=tmp_path, ok=False), "NoTpmStateError")
    run("init", "--state", "h", cwd=tmp_path)  # without --issuer: a private issuer in h/issuer
    assert (tmp_path / "h" / "issuer" / "issuer.pub.pem").exists()
    assert_one_line_error(run("quote", "--state", "h", "--nonce", "zz", "--out", "q", cwd=tmp_path, ok=False), "hex")
    assert_one_line_error(run("extend", "--state", "h", "--pcr", "24", cwd=tmp_path, ok=False), "PCR index")
    assert_one_line_error(run("issuer", "init", "h/issuer", cwd=tmp_path, ok=False), "already exists")
    state = tmp_path / "h" / "tpm-state.bin"
    raw = state.read_bytes()
    # Flip the last byte (part of the file's MAC): writing a fixed value left the file
    # unchanged whenever the MAC already ended in that byte, 1 run in 256 (a CI failure).
    state.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    assert_one_line_error(run("pcrs", "--state", "h", cwd=tmp_path, ok=False), "CorruptStateError")


def test_default_state_directory(tmp_path):
    run("init", cwd=tmp_path)
    assert (tmp_path / ".minivmm-tpm" / "tpm-state.bin").exists()
    env_dir = tmp_path / "env-state"
    p = subprocess.run(
        [sys.executable, "-m", "tpm", "init"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "MINIVMM_TPM_STATE": str(env_dir)}, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert (env_dir / "tpm-state.bin").exists()


def test_read_only_commands_do_not_power_cycle(tmp_path):
    run("init", "--state", "h", cwd=tmp_path)
    run("extend", "--state", "h", "--text", "x", cwd=tmp_path)
    for cmd in ("log", "info", "pcrs"):
        out = run(cmd, "--state", "h", cwd=tmp_path).stdout
    assert "PCR  8" in out


def test_export_writes_the_files_real_tools_read(tmp_path):
    from tpm import Evidence

    run("init", "--state", "h", cwd=tmp_path)
    run("extend", "--state", "h", "--pcr", "8", "--text", "kernel", cwd=tmp_path)
    run("quote", "--state", "h", "--nonce", "0a0b", "--pcrs", "8", "--out", "q.bin", cwd=tmp_path)
    p = run("export", "--quote", "q.bin", "--dir", "parts", cwd=tmp_path)
    assert "tpm2_checkquote -u" in p.stdout and "-q 0a0b" in p.stdout
    ev = Evidence.from_bytes((tmp_path / "q.bin").read_bytes())
    parts = tmp_path / "parts"
    assert (parts / "attest.bin").read_bytes() == ev.attest_bytes
    assert (parts / "signature.bin").read_bytes() == ev.signature
    assert (parts / "eventlog.bin").read_bytes() == ev.eventlog_bytes
    assert (parts / "eventlog.bin").read_bytes()[8:28] == bytes(20)  # the Spec ID event first
    assert (parts / "ak.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    (tmp_path / "bad.bin").write_bytes(b"MVQB\x00\x01")
    assert_one_line_error(run("export", "--quote", "bad.bin", "--dir", "x", cwd=tmp_path, ok=False),
                          "QuoteFormatError")
