"""Measuring a VMM at start: its code, its configuration, its protection policy.

Measured boot means "hash it and extend a PCR *before* it runs": once the VMM is
running it could lie about itself, but it cannot undo an extend.  Three PCRs, one
per concern, so a verifier (and a student reading ``minivmm-tpm pcrs``) can see
*which* of them changed:

    PCR 8   VMM_CODE    SHA-256 of the code manifest (below)
    PCR 9   VMM_CONFIG  SHA-256 of the canonical JSON of the VMM configuration
    PCR 10  VMM_POLICY  SHA-256 of the canonical JSON of the protection policy

(PCRs 0-7 belong to firmware on a PC-Client TPM; 8 and up are for the OS/loader.)

Each extend is logged with the measured bytes as the event data, so the verifier
can check that digest = SHA-256(data) and show what was measured.

Code manifest (deterministic: sorted relative names, content hashes)::

    minivmm-code-manifest v1\\n
    <sha256 hex of file content>  <relative/posix/name>\\n     (one per file, sorted by name)

Directories are expanded recursively (``__pycache__`` skipped, and a mutation tool's
``X.py.meta``/``X.py.spans`` beside ``X.py``: see TOOL_BOOKKEEPING); a ``*.pyc`` outside
``__pycache__`` or a symbolic link to a directory is refused (MeasurementError).
Relative names are taken from ``root`` if given, else from each given path's
own parent (``minivmm/cpu.py``, ``tpm/quote.py``), so the measurement does not
depend on where the VMM is installed, nor on its packages being imported from
different places (a checkout beside an install: a common parent would then be
``/`` and every name would carry the install path).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MeasurementError
from .eventlog import MAX_EVENT_DATA, Event, EventType
from .pcr import PcrSelection

if TYPE_CHECKING:  # pragma: no cover
    from .softtpm import SoftTpm

VMM_CODE_PCR = 8
VMM_CONFIG_PCR = 9
VMM_POLICY_PCR = 10
VMM_PCRS = PcrSelection([VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR])
MANIFEST_HEADER = b"minivmm-code-manifest v2\n"
NATIVE_PREFIX = "native:"


#: Files a mutation-testing run (mutmut, docs/testing.md) writes beside each module it
#: mutated: ``source.py.meta``, ``source.py.spans``.  Python never imports them (a module
#: name has no dots, and neither suffix is one an import loader takes), so they are
#: not code; measured, their ~50 names pushed the manifest past its event bound.
TOOL_BOOKKEEPING = (".py.meta", ".py.spans")


def _tool_bookkeeping(name: str, siblings) -> bool:
    """``name`` is a tool's bookkeeping file beside the module it describes (that
    module present in the same directory): not measured.  Anything else is."""
    for suffix in TOOL_BOOKKEEPING:
        if name.endswith(suffix) and name[:-len(suffix)] + ".py" in siblings:
            return True
    return False


def _expand(paths: list[Path]) -> list[Path]:
    files: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                # Refused, not skipped: each is code Python would import that the
                # walk would not see.  os.walk does not enter a symbolic link to a
                # directory, but the import system does (a package shadowing a
                # module of the same name); a compiled module outside __pycache__
                # is imported without any source (a directory holding only
                # __init__.pyc shadows the measured X.py).
                for d in dirnames:
                    if os.path.islink(os.path.join(dirpath, d)):
                        raise MeasurementError(f"cannot measure {os.path.join(dirpath, d)}: a symbolic link to "
                                               f"a directory (what it holds would be imported unmeasured)")
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for f in sorted(filenames):
                    if f.endswith(".pyc"):
                        raise MeasurementError(f"cannot measure {os.path.join(dirpath, f)}: a compiled module "
                                               f"outside __pycache__ (Python imports it without its source)")
                    if not _tool_bookkeeping(f, filenames):
                        files[Path(dirpath) / f] = None
        elif p.is_file():
            files[p] = None
        else:
            raise MeasurementError(f"cannot measure {p}: no such file or directory")
    return list(files)


def _file_digest(f: Path) -> str:
    try:
        return hashlib.sha256(f.read_bytes()).hexdigest()
    except OSError as e:
        raise MeasurementError(f"cannot read {f}: {e.strerror}") from None


def code_manifest(
    code_paths: list[Path | str],
    root: Path | str | None = None,
    *,
    native_libraries: Sequence[tuple[str, Path | str]] = (),
) -> bytes:
    """The canonical manifest of the VMM's code files (what PCR 8 measures).

    ``native_libraries``: (label, path) of shared libraries the code loads, measured
    after the package files in this order (see the module docstring).
    """
    paths = [Path(p).absolute() for p in code_paths]
    if not paths:
        raise MeasurementError("no code paths to measure")
    if root is None:
        named = [(f, p.parent) for p in paths for f in _expand([p])]
    else:
        named = [(f, Path(root).absolute()) for f in _expand(paths)]
    entries: dict[str, str] = {}
    for f, anchor in named:
        try:
            rel = f.relative_to(anchor).as_posix()
        except ValueError:
            raise MeasurementError(f"{f} is not under the measurement root {anchor}") from None
        if rel in entries:
            raise MeasurementError(f"two measured files are both named {rel!r}")
        if "\n" in rel or "\r" in rel:
            raise MeasurementError(f"cannot measure a file name containing a newline: {rel!r}")
        if rel.startswith(NATIVE_PREFIX):
            raise MeasurementError(f"a package file may not be named {rel!r} (reserved for native libraries)")
        entries[rel] = _file_digest(f)
    lines = [f"{digest}  {name}\n" for name, digest in sorted(entries.items())]
    labels: set[str] = set()
    for label, path in native_libraries:
        if not label or any(c in label for c in "\r\n") or label in labels:
            raise MeasurementError(f"bad or repeated native library label {label!r}")
        labels.add(label)
        path = Path(path)
        if not path.is_file():
            raise MeasurementError(f"cannot measure native library {label}: {path} is not a file")
        lines.append(f"{_file_digest(path)}  {NATIVE_PREFIX}{label}\n")
    manifest = MANIFEST_HEADER + "".join(lines).encode("utf-8")
    if len(manifest) > MAX_EVENT_DATA:
        raise MeasurementError(
            f"code manifest of {len(manifest)} bytes exceeds the event bound {MAX_EVENT_DATA}"
        )
    return manifest


def canonical_json(obj: object, what: str = "document") -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    try:
        data = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise MeasurementError(f"cannot measure {what}: not plain JSON ({e})") from None
    if len(data) > MAX_EVENT_DATA:
        raise MeasurementError(f"{what} of {len(data)} bytes exceeds the event bound {MAX_EVENT_DATA}")
    return data


def vmm_events(
    code_paths: list[Path | str],
    config: dict,
    policy: dict,
    *,
    root: Path | str | None = None,
    native_libraries: Sequence[tuple[str, Path | str]] = (),
) -> list[Event]:
    """The events a measured start of this VMM produces, without touching a TPM.

    Useful to build an approval policy on a machine other than the host
    (see :func:`tpm.policy.AttestationPolicy.from_events`).
    """
    if not isinstance(config, dict) or not isinstance(policy, dict):
        raise MeasurementError("config and policy must be dicts")
    items = [
        (VMM_CODE_PCR, EventType.VMM_CODE,
         code_manifest(code_paths, root, native_libraries=native_libraries)),
        (VMM_CONFIG_PCR, EventType.VMM_CONFIG, canonical_json(config, "VMM config")),
        (VMM_POLICY_PCR, EventType.VMM_POLICY, canonical_json(policy, "protection policy")),
    ]
    return [Event(pcr, etype, hashlib.sha256(data).digest(), data) for pcr, etype, data in items]


def measure_vmm(
    tpm: "SoftTpm",
    code_paths: list[Path | str],
    config: dict,
    policy: dict,
    *,
    root: Path | str | None = None,
    native_libraries: Sequence[tuple[str, Path | str]] = (),
    check=None,
) -> list[Event]:
    """Measure a VMM into ``tpm``: extend PCRs 8, 9, 10 and log the events.

    Everything is hashed *before* the first extend, so a measurement that fails
    (unreadable file, non-JSON config) extends nothing.  ``check(events)``, if
    given, runs after the hashing and before the first extend: its
    MeasurementError extends nothing either (the VMM's check that the code it
    runs is the code measured: ``migrate/codeguard.py``).
    """
    events = vmm_events(code_paths, config, policy, root=root, native_libraries=native_libraries)
    if check is not None:
        check(events)
    for e in events:
        tpm.extend(e.pcr, e.digest, event_type=e.type, data=e.data)
    return events
