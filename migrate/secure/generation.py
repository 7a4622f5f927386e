"""Per-VM identity and migration generation (DESIGN §6, obligation 5: replay of a
whole earlier stream).

Each VM carries an identity (random, 16 bytes hex, made at its first secure
migration) and a generation that grows by one at every migration.  Both
travel in HELLO's info, which the transcript hash covers and both quotes
bind, so they are authenticated once attestation succeeds.  The destination
keeps, per VM, the last generation it accepted in its TPM's monotonic NV
counter ``vm-<id>`` (it survives a restart of the VMM and of the TPM), and
refuses a generation that is not newer.  The counter is checked as soon as
the source is attested and advanced on a thread beside the pre-copy rounds
(its NV writes stay out of the handshake and the downtime), which the
destination waits for before PREPARED: the VM never resumes there unless the
counter holds its generation.  The source spends one
generation per attempt that got past mutual attestation, so a retry after a
later failure is newer still, while connections cut before attestation spend
nothing (else a man in the middle could run the generation past ``MAX_STEP``
and lock the VM out of a destination for good).  A man in the middle who lets
attestation through and then cuts can still open gaps, one per attempt: a
counter that can be set to a value (not only incremented) would remove
``MAX_STEP`` and that residue.
"""

from __future__ import annotations

import os
import re

from migrate.errors import ProtocolError
from migrate.secure.errors import StaleGeneration

MAX_STEP = 64               # a generation may jump (A->B->A: B saw 1, A sees 2), not without bound
_ID = re.compile(r"[0-9a-f]{32}")


def new_identity() -> str:
    return os.urandom(16).hex()


def parse(info: dict) -> tuple[str, int]:
    vm_id, gen = info.get("vm_id"), info.get("generation")
    if not isinstance(vm_id, str) or not _ID.fullmatch(vm_id):
        raise ProtocolError("HELLO: secure migration needs a vm_id of 32 hex digits")
    if not isinstance(gen, int) or isinstance(gen, bool) or not 1 <= gen < 1 << 40:
        raise ProtocolError("HELLO: secure migration needs a generation >= 1")
    return vm_id, gen


def counter_name(vm_id: str) -> str:
    return f"vm-{vm_id}"


def check(tpm, vm_id: str, generation: int) -> int:
    """Raise StaleGeneration unless ``generation`` is newer than the last accepted."""
    last = tpm.counter_read(counter_name(vm_id))
    if generation <= last:
        raise StaleGeneration(f"VM {vm_id[:12]}... generation {generation} is not newer than {last}, "
                              f"the last this destination accepted: a replayed or stale migration")
    if generation - last > MAX_STEP:
        raise StaleGeneration(f"VM {vm_id[:12]}... generation {generation} jumps too far past {last}")
    return last


def accept(tpm, vm_id: str, generation: int) -> None:
    """Advance the NV counter to ``generation`` (monotonic: only up)."""
    name = counter_name(vm_id)
    while tpm.counter_read(name) < generation:
        tpm.counter_increment(name)
