"""Never resume an old copy of a VM that has left this host (issue 13 item 6).

A VM carries its identity and migration generation in its state
(``Machine.migration_identity``, saved in state files).  Two records on this
host say which generations are old:

* the durable migrated-away mark (``commit.MigrationMark``, in the TPM
  directory): the VM left (or was leaving: ``pending``) at generation g;
* the TPM NV counter ``vm-<id>``: the highest generation of the VM this host
  has sent or received (a secure source advances it when it spends a
  generation, a destination when it accepts one).  The counter cannot be
  deleted like a file (the soft TPM detects a rolled-back counters file).

A state whose generation is below either is an old copy:
:func:`check_restore` refuses it (``run --restore``, with or without
``--migrate-to``) with the mark, where the VM went, and the recovery path.
A destination refuses such a copy on its own (``generation.check``), so a
host that skips this check still cannot migrate it again.
"""

from __future__ import annotations

from pathlib import Path

from migrate.secure import commit, generation
from migrate.secure.errors import OldCopy


def check_restore(machine, tpm_dir: Path | str, where: str, *, tpm=None) -> None:
    """Raise :class:`OldCopy` if ``machine`` is an older copy of a VM that left
    this host: by the mark in ``tpm_dir``, or by the NV counter of ``tpm``
    (default: the TPM in ``tpm_dir``, if there is one)."""
    vm_id, gen = machine.migration_identity
    tpm_dir = Path(tpm_dir)
    mark = commit.read_mark(tpm_dir, vm_id)
    if mark and mark.get("state") in ("migrated-away", "pending"):
        left = mark.get("generation")
        if not isinstance(left, int) or gen < left:
            path = tpm_dir / f"migration-{vm_id}.mark"
            to = f" to {mark['to']}" if mark.get("to") else ""
            raise OldCopy(
                f"{where}: VM {vm_id[:12]}... is marked {mark['state']} from this host{to} at generation "
                f"{left} ({path}); this state is generation {gen}, an older copy: it is never resumed or "
                f"migrated again here. The VM runs at its destination now (migrate it back from there); "
                f"if that migration's commit was never confirmed, continue it only with 'minivmm recover "
                f"FILE' (the sealed recovery file written then)")
    if tpm is None and (tpm_dir / "tpm-state.bin").exists():
        from tpm import SoftTpm
        tpm = SoftTpm.open(tpm_dir, startup=None, create=False)
    if tpm is not None:
        last = tpm.counter_read(generation.counter_name(vm_id))
        if gen < last:
            raise OldCopy(
                f"{where}: stale state: VM {vm_id[:12]}... generation {gen}, but this host's TPM ({tpm_dir}) "
                f"has seen generation {last} of it (it migrated, or tried to, since): an older copy is never "
                f"resumed or migrated again")
