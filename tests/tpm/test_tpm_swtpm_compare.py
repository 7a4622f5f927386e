"""Cross-check against a real TPM 2.0: swtpm (libtpms) driven by tpm2-tools.

The same PCR values are quoted by swtpm and by the model; both quotes are verified by
the project's verifier *and* by ``tpm2_checkquote``; the model's TPMS_ATTEST is decoded
by ``tpm2_print`` and its event log replayed by ``tpm2_eventlog``.  PCR extend and the
TPM2_PolicyPCR digest (what tpm.seal binds to) are compared with swtpm's.

Needs the Debian packages ``swtpm`` and ``tpm2-tools`` (``.ci/run`` installs them);
skips, naming what is missing, where they are not installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shlex

import pytest
from cryptography.hazmat.primitives import serialization

from tpm import (AttestationPolicy, Evidence, SoftTpm, Verifier, keys, measure_vmm, pcr_digest)
from tpm.cli import main
from tpm.issuer import ENDORSEMENT_QN
from tpm.pcr import PcrBank, PcrSelection
from tpm.quote import Attest
from tpm.seal import policy_pcr_digest

from swtpm_tools import SwTpm, missing_tools, run_tool, yaml_fields, yaml_pcrs
from tpm_testdata import CONFIG, PROTECTION

_missing = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"real-TPM cross-check needs swtpm and tpm2-tools (missing: {', '.join(_missing)}); "
    "install the Debian packages swtpm swtpm-tools tpm2-tools",
)


@pytest.fixture
def swtpm(tmp_path):
    work = tmp_path / "swtpm"
    work.mkdir()
    t = SwTpm(work).start()
    try:
        yield t
    finally:
        t.stop()


def _read_pcrs(swtpm: SwTpm, indices: list[int]) -> list[bytes]:
    swtpm.run("tpm2_pcrread", f"sha256:{','.join(map(str, indices))}", "-o", "pcrs.bin")
    raw = swtpm.path("pcrs.bin").read_bytes()
    assert len(raw) == 32 * len(indices)
    return [raw[32 * i:32 * (i + 1)] for i in range(len(indices))]


def test_pcr_extend_matches_swtpm(swtpm):
    bank = PcrBank()
    for d in (hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()):
        swtpm.run("tpm2_pcrextend", f"16:sha256={d.hex()}")
        bank.extend(16, d)
    assert _read_pcrs(swtpm, [16]) == [bank.read(16)]
    assert bank.read(16) != PcrBank().read(16)


def test_policy_pcr_digest_matches_swtpm(swtpm):
    values = [hashlib.sha256(bytes([i])).digest() for i in (8, 9, 10)]
    swtpm.path("values.bin").write_bytes(b"".join(values))
    swtpm.run("tpm2_startauthsession", "-S", "session.ctx", flush=False)  # a trial session
    swtpm.run("tpm2_policypcr", "-S", "session.ctx", "-l", "sha256:8,9,10", "-f", "values.bin",
              "-L", "policy.bin", flush=False)
    swtpm.run("tpm2_flushcontext", "session.ctx", flush=False)
    theirs = swtpm.path("policy.bin").read_bytes()
    assert theirs == policy_pcr_digest(PcrSelection([8, 9, 10]), pcr_digest(values))


@pytest.fixture
def both(swtpm, tmp_path, issuer, vmm_code):
    """The model measured as a VMM, and swtpm extended with the same digests."""
    model = SoftTpm.open(tmp_path / "model", issuer=issuer, host="model")
    events = measure_vmm(model, [vmm_code], CONFIG, PROTECTION)
    for e in events:
        swtpm.run("tpm2_pcrextend", f"{e.pcr}:sha256={e.digest.hex()}")
    assert _read_pcrs(swtpm, [8, 9, 10]) == [model.read_pcr(i) for i in (8, 9, 10)]
    swtpm.run("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
    swtpm.run("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
              "-s", "ecdsa", "-u", "ak.pem", "-f", "pem", "-n", "ak.name")
    swtpm.run("tpm2_readpublic", "-c", "ek.ctx", "-n", "ek.name")
    swtpm.run("tpm2_readpublic", "-c", "ak.ctx", "-f", "tpmt", "-o", "ak.tpmt")
    return model, swtpm


def _swtpm_quote(swtpm: SwTpm, nonce: bytes) -> tuple[bytes, bytes]:
    swtpm.run("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:8,9,10", "-q", nonce.hex(), "-g", "sha256",
              "-m", "swtpm.attest", "-s", "swtpm.sig", "-o", "swtpm.pcrs")
    return swtpm.path("swtpm.attest").read_bytes(), swtpm.path("swtpm.sig").read_bytes()


def test_swtpm_quote_verifies_with_the_project_verifier(both, issuer):
    model, swtpm = both
    verifier = Verifier([issuer])
    nonce = verifier.new_nonce()
    attest, signature = _swtpm_quote(swtpm, nonce)
    ak_public = swtpm.path("ak.tpmt").read_bytes()
    ek_qn = keys.qualified_name(ENDORSEMENT_QN, swtpm.path("ek.name").read_bytes())
    # live known answer: swtpm's qualifiedSigner is the Qualified Name the model computes
    assert Attest.from_bytes(attest).qualified_signer == keys.qualified_name(ek_qn, keys.name_of(ak_public))
    cert = issuer.certify(ak_public, "swtpm", parent_qualified_name=ek_qn)
    evidence = Evidence.build(attest, signature, cert, model.event_log())
    policy = AttestationPolicy.from_events(model.event_log())
    result = verifier.verify(evidence.to_bytes(), policy)
    assert result.host == "swtpm"
    assert result.pcr_values == {i: model.read_pcr(i) for i in (8, 9, 10)}
    # and the model's own quote of the same PCR values, by the same verifier
    verifier.verify(model.quote(verifier.new_nonce()).to_bytes(), policy)


def test_both_quotes_pass_tpm2_checkquote(both):
    model, swtpm = both
    nonce = b"cross-check nonce"
    _swtpm_quote(swtpm, nonce)
    work = swtpm.workdir
    ok = run_tool("tpm2_checkquote", "-u", "ak.pem", "-m", "swtpm.attest", "-s", "swtpm.sig",
                  "-f", "swtpm.pcrs", "-g", "sha256", "-q", nonce.hex(), cwd=work)
    assert ok.returncode == 0, ok.stderr

    ev = model.quote(nonce)
    ak_key, _ = keys.parse_public_area(ev.certificate.ak_public)
    (work / "model-ak.pem").write_bytes(ak_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (work / "model.attest").write_bytes(ev.attest_bytes)
    (work / "model.sig").write_bytes(ev.signature)
    # swtpm.pcrs holds the PCR values swtpm quoted: the model's quote is checked against them
    args = ["tpm2_checkquote", "-u", "model-ak.pem", "-m", "model.attest", "-s", "model.sig",
            "-f", "swtpm.pcrs", "-g", "sha256"]
    ok = run_tool(*args, "-q", nonce.hex(), cwd=work)
    assert ok.returncode == 0, ok.stderr
    assert yaml_pcrs(ok.stdout) == {i: model.read_pcr(i) for i in (8, 9, 10)}
    # the same check refuses a wrong nonce and a different PCR value: it can fail
    assert run_tool(*args, "-q", (b"other" + nonce).hex(), cwd=work).returncode != 0
    model.extend(10, hashlib.sha256(b"later").digest())
    ev2 = model.quote(nonce)
    (work / "model2.attest").write_bytes(ev2.attest_bytes)
    (work / "model2.sig").write_bytes(ev2.signature)
    bad = run_tool("tpm2_checkquote", "-u", "model-ak.pem", "-m", "model2.attest", "-s", "model2.sig",
                   "-f", "swtpm.pcrs", "-g", "sha256", "-q", nonce.hex(), cwd=work)
    assert bad.returncode != 0


def test_tpm2_print_decodes_the_model_quote(both):
    model, swtpm = both
    ev = model.quote(b"print me")
    swtpm.path("model.attest").write_bytes(ev.attest_bytes)
    out = run_tool("tpm2_print", "-t", "TPMS_ATTEST", "model.attest", cwd=swtpm.workdir)
    assert out.returncode == 0, out.stderr
    f = yaml_fields(out.stdout)
    a = ev.attest
    assert f["magic"] == "ff544347" and f["type"] == "8018"
    assert f["qualifiedSigner"] == model.ak_qualified_name.hex()
    assert f["extraData"] == b"print me".hex()
    assert int(f["clock"]) == a.clock_info.clock
    assert int(f["resetCount"]) == a.clock_info.reset_count
    assert int(f["restartCount"]) == a.clock_info.restart_count
    assert int(f["safe"]) == 1
    # tpm2-tools 5 prints the UINT64 as its in-memory (little-endian) bytes in hex
    assert f["firmwareVersion"] == a.firmware_version.to_bytes(8, "little").hex()
    assert f["pcrSelect"] == "000700"
    assert f["pcrDigest"] == a.pcr_digest.hex()


def test_tpm2_eventlog_replays_the_model_log(both, tmp_path):
    model, swtpm = both
    model.extend(8, hashlib.sha256(b"by hand").digest(), data=b"by hand")  # a manual event too
    path = tmp_path / "model-eventlog.bin"
    path.write_bytes(model.event_log().to_bytes())
    out = run_tool("tpm2_eventlog", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Spec ID Event03" in out.stdout and out.stdout.count("PCRIndex:") == 5
    assert yaml_pcrs(out.stdout) == {i: model.read_pcr(i) for i in (8, 9, 10)}


def test_the_exported_files_pass_the_commands_export_prints(tmp_path, issuer, vmm_code):
    """`minivmm-tpm export` prints three commands; each accepts the files it wrote."""
    model = SoftTpm.open(tmp_path / "host", issuer=issuer)
    measure_vmm(model, [vmm_code], CONFIG, PROTECTION)
    (tmp_path / "q.bin").write_bytes(model.quote(b"export").to_bytes())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", "--quote", str(tmp_path / "q.bin"), "--dir", str(tmp_path / "parts")]) == 0
    commands = [line.strip() for line in buf.getvalue().splitlines() if line.startswith("  tpm2_")]
    assert [c.split()[0] for c in commands] == ["tpm2_print", "tpm2_eventlog", "tpm2_checkquote"]
    for command in commands:
        p = run_tool(*shlex.split(command), cwd=tmp_path)
        assert p.returncode == 0, (command, p.stderr)
