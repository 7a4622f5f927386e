"""Shared fixtures for the software-TPM tests (real crypto, real files, no mocks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO, HERE):  # the package is used from the work tree, not installed
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tpm import AttestationPolicy, Issuer, SoftTpm, Verifier, measure_vmm  # noqa: E402
from tpm_testdata import CONFIG, PROTECTION  # noqa: E402


@pytest.fixture
def vmm_code(tmp_path: Path) -> Path:
    """A small stand-in for the VMM's code tree."""
    root = tmp_path / "vmm-src" / "minivmm"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("VERSION = 1\n")
    (root / "cpu.py").write_text("def run():\n    return 42\n")
    (root / "sub" / "mmu.py").write_text("PAGE = 4096\n")
    return root


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer.create(tmp_path / "issuer", "test-issuer")


@pytest.fixture
def tpm(tmp_path: Path, issuer: Issuer) -> SoftTpm:
    return SoftTpm.open(tmp_path / "host-a", issuer=issuer, host="host-a")


@pytest.fixture
def measured(tpm: SoftTpm, vmm_code: Path) -> SoftTpm:
    measure_vmm(tpm, [vmm_code], CONFIG, PROTECTION)
    return tpm


@pytest.fixture
def policy(measured: SoftTpm) -> AttestationPolicy:
    return AttestationPolicy.from_events(measured.event_log())


@pytest.fixture
def verifier(issuer: Issuer) -> Verifier:
    return Verifier([issuer.public_key])
