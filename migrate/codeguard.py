"""The code that runs is the code measured: the measurement's side of ``minivmm_boot``.

PCR 8 measures the *source* of the VMM's packages; the launcher
(``minivmm_boot.py``, outside them) hashes every source file of them before
any of them runs, and from then on loads a module of theirs only from one of
those files, compiled from source (never a pyc), and only while it still has
its hash.  :func:`guard` runs inside the measurement, after the hashing and
before the first extend, and refuses the start
(:class:`~tpm.errors.MeasurementError`, nothing extended) unless

* the launcher is installed, and no module of the measured packages was
  imported before it (from a pyc nobody checked);
* the manifest about to be extended holds exactly the hashes the launcher took
  at the start (a source changed between the start and the measurement is
  caught: the load-order race).

Why not check pycs, or what was compiled, after it ran: that code runs before
any check can, in the same process, and can delete its pyc, replace the
checker or rewrite the record; and two code objects compare equal across
changed specialised opcodes (hostile reviews of earlier versions of this
module, which did exactly that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import minivmm_boot
from tpm.errors import MeasurementError


def manifest_digests(code_paths: Iterable[Path | str], manifest: bytes) -> dict[str, str]:
    """{real path of a measured file: its SHA-256 hex} from a code manifest
    (``tpm.measure.code_manifest``: names relative to each measured path's parent)."""
    parents = {Path(p).absolute().name: Path(p).absolute().parent for p in code_paths}
    out: dict[str, str] = {}
    for line in manifest.decode("utf-8").splitlines()[1:]:
        digest, _, name = line.partition("  ")
        top = name.split("/", 1)[0]
        if top in parents:                  # (native: lines name no package)
            out[os.path.realpath(parents[top] / name)] = digest
    return out


def guard(code_paths: Iterable[Path | str], manifest: bytes) -> None:
    """Refuse (MeasurementError) unless the code this process runs, and may
    still import, is the code in ``manifest``."""
    boot = minivmm_boot.active()
    if boot is None:
        raise MeasurementError("this process did not start through the VMM's launcher (the minivmm "
                               "command, or python -m minivmm_boot), so its modules may have been "
                               "loaded from bytecode nobody measured: refusing to measure it")
    early = minivmm_boot.early_modules()
    if early:
        raise MeasurementError(f"{len(early)} module(s) of the measured packages were imported before the "
                               f"launcher's source-only import was installed (first: {early[0]}): they may "
                               f"run unmeasured bytecode; refusing to measure this process")
    try:
        boot.seal(manifest_digests(code_paths, manifest))
    except minivmm_boot.NotMeasured as exc:
        raise MeasurementError(str(exc)) from None
