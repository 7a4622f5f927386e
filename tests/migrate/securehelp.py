"""Trust set-up for secure-protocol tests: one issuer, one policy, host TPMs
measured as a secure VMM would measure itself at start."""

from __future__ import annotations

from pathlib import Path

from migrate.measure import measure_start
from migrate.secure import trust
from migrate.secure.attest import Attestor
from migrate.secure.mode import SecureMode
from migrate.secure.setup import certify, protection_policy, setup

from inproc import receive_in_thread


class Trust:
    def __init__(self, base: Path, configurations=({},)):
        self.base = Path(base)
        self.issuer, self.policy = setup(self.base, configurations)

    def host(self, name: str, *, insecure=(), role="source") -> Path:
        """A host TPM, measured (TPM reset) as a secure VMM with ``insecure``
        defences off, AK certified by the issuer."""
        tpm_dir = self.base / name
        measure_start(tpm_dir, {"role": role}, protection_policy(insecure=insecure))
        certify(tpm_dir, self.issuer)
        trust.measure(tpm_dir, self.issuer, self.policy)     # as a secure VMM start does
        return tpm_dir

    def mode(self, tpm_dir: Path, *, insecure=()) -> SecureMode:
        return SecureMode(Attestor(tpm_dir, self.issuer, self.policy), insecure=insecure)


def secure_receive_in_thread(server, result, mode_factory, *, timeout=10.0, run_ticks=100_000):
    """As inproc.receive_in_thread, with a SecureMode per session."""
    return receive_in_thread(server, result, timeout=timeout, run_ticks=run_ticks, mode_factory=mode_factory)
