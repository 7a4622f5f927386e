"""Issue 4, point 2: a VMM that starts to serve or to migrate measures itself
into its host's software TPM before it touches a guest.

What is measured (``tpm.measure.measure_vmm``, PCRs 8, 9, 10):

* code: the packages this VMM runs -- ``minivmm``, ``guests``, ``migrate``,
  ``tpm`` -- as a manifest of content hashes (names relative to their
  common parent, so the install location does not matter);
* config: the VMM's canonical configuration (role, run mode, timer, the
  pre-copy policy, timeouts, protocol version) -- not addresses or ports,
  which change from run to run without changing what the VMM does;
* policy: its protection policy (:data:`PROTECTION_POLICY`).

Each start is a TPM Reset (``startup="clear"``): the VMM's start is this
host's measured boot, so PCRs 8-10 hold exactly one measurement of it.  The
state directory defaults to ``$MINIVMM_TPM_STATE/<role>`` (or
``.minivmm-tpm/<role>``), one per role so that a source and a destination on
one machine have separate TPMs, as two hosts would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import guests
import minivmm
import tpm as tpm_pkg
from tpm import SoftTpm, measure_vmm
from tpm.measure import VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR

import migrate
from migrate.wire import VERSION

PROTECTION_POLICY = {"protection": "cloaking", "keys": "os.urandom", "migration": "plain",
                     "migration_protocol": VERSION}


def default_tpm_dir(role: str) -> Path:
    return Path(os.environ.get("MINIVMM_TPM_STATE", ".minivmm-tpm")) / role


def code_paths() -> list[Path]:
    return [Path(p.__file__).parent for p in (minivmm, guests, migrate, tpm_pkg)]


@dataclass(frozen=True)
class Measurement:
    tpm_dir: str
    pcrs: dict[int, str]
    config: dict
    policy: dict
    files: int

    def describe(self) -> str:
        return (f"measured into TPM {self.tpm_dir}: PCR 8 (code, {self.files} files) "
                f"{self.pcrs[VMM_CODE_PCR][:16]}..., PCR 9 (config) {self.pcrs[VMM_CONFIG_PCR][:16]}..., "
                f"PCR 10 (protection policy) {self.pcrs[VMM_POLICY_PCR][:16]}...")


def measure_start(tpm_dir: Path | str, config: dict, policy: dict | None = None) -> Measurement:
    policy = dict(PROTECTION_POLICY if policy is None else policy)
    tpm = SoftTpm.open(tpm_dir, startup="clear")
    events = measure_vmm(tpm, code_paths(), config, policy)
    files = events[0].data.count(b"\n") - 1
    pcrs = {i: tpm.read_pcr(i).hex() for i in (VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR)}
    return Measurement(str(tpm_dir), pcrs, config, policy, files)
