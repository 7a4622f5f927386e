"""Optional cross-check against a real TPM 2.0 implementation (swtpm via tpm2-pytss).

Runs only where both ``swtpm`` and ``tpm2_pytss`` are installed; skips cleanly
elsewhere.  It compares (1) PCR extend and (2) the TPM2_PolicyPCR policy digest
that tpm.seal computes with what swtpm's reference TPM produces.
"""

import hashlib
import shutil
import socket
import subprocess
import time

import pytest

from tpm.pcr import PcrBank, PcrSelection
from tpm.seal import policy_pcr_digest

tpm2_pytss = pytest.importorskip("tpm2_pytss")
if shutil.which("swtpm") is None:  # pragma: no cover - depends on the machine
    pytest.skip("swtpm is not installed", allow_module_level=True)


def _free_port_pair() -> int:
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    pytest.skip("no free port pair for swtpm")


@pytest.fixture
def esapi(tmp_path):
    from tpm2_pytss import ESAPI, TCTILdr

    port = _free_port_pair()
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={tmp_path}",
            "--server", f"type=tcp,port={port}",
            "--ctrl", f"type=tcp,port={port + 1}",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = None
    try:
        for _ in range(50):
            try:
                ctx = ESAPI(TCTILdr("swtpm", f"host=127.0.0.1,port={port}"))
                break
            except Exception:
                time.sleep(0.1)
        if ctx is None:
            pytest.skip("could not connect to swtpm")
        yield ctx
    finally:
        if ctx is not None:
            ctx.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_pcr_extend_matches_swtpm(esapi):
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPML_PCR_SELECTION, TPMT_HA

    digests = [hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()]
    bank = PcrBank()
    for d in digests:
        esapi.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=d)]))
        bank.extend(16, d)
    _, _, values = esapi.pcr_read(TPML_PCR_SELECTION.parse("sha256:16"))
    assert bytes(values.digests[0]) == bank.read(16)


def test_policy_pcr_digest_matches_swtpm(esapi):
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPML_PCR_SELECTION, TPMT_SYM_DEF

    session = esapi.start_auth_session(
        tpm_key=ESYS_TR.NONE,
        bind=ESYS_TR.NONE,
        session_type=TPM2_SE.TRIAL,
        symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        auth_hash=TPM2_ALG.SHA256,
    )
    try:
        pcr_digest = hashlib.sha256(b"pcr values").digest()
        esapi.policy_pcr(session, pcr_digest, TPML_PCR_SELECTION.parse("sha256:8,9,10"))
        theirs = bytes(esapi.policy_get_digest(session))
    finally:
        esapi.flush_context(session)
    assert theirs == policy_pcr_digest(PcrSelection([8, 9, 10]), pcr_digest)
