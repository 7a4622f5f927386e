"""The code that runs is the code measured: bytecode and late imports.

PCR 8 measures the *source* of the VMM's packages (``migrate/measure.py``), but
Python does not always run the source.  For ``X.py`` it first looks for
``__pycache__/X.cpython-311.pyc`` (or the same name under ``sys.pycache_prefix``)
and runs that instead if its header says it is current: a timestamp pyc whose
recorded mtime and size match ``X.py``'s, a checked hash pyc whose recorded
hash matches ``X.py``'s, or an *unchecked* hash pyc, whatever it holds.  None of
these checks looks at the code inside.  So anyone who can write next to the
VMM's files can leave a measured ``X.py`` untouched and put other code in its
pyc: PCR 8 stays the value the policy approves, the VMM runs something else
(a hostile review did it).

Two checks close that, once the VMM has measured itself:

* :func:`check_loaded`: every module of the measured packages already imported
  (the CLI, the engine, the TPM: everything the start itself needed) whose pyc
  Python would have used is compared, code object against code object, with
  the measured source compiled now; a difference refuses the start
  (:class:`~tpm.errors.MeasurementError`).  The source compiled is checked
  against the manifest's digest first, so the comparison is with the bytes
  PCR 8 holds.
* :func:`install`: every *later* import from the measured packages (a command's
  modules, the secure layer, the TUI) compiles the measured source and never
  reads a pyc; a source that no longer hashes to the manifest's digest, or a
  module file that was not measured at all, is refused (:class:`NotMeasured`,
  an ImportError).  This also closes the load-order race for those modules: a
  file changed between the measurement and its import is caught at the import.

Left open (docs/tpm.md): a module imported *from source* before the
measurement, whose file is changed in the ~second between that import and the
measurement, runs the old code under the new code's PCR 8; when Python writes
bytecode, its fresh pyc shows the old code and :func:`check_loaded` catches it,
but under ``PYTHONDONTWRITEBYTECODE`` nothing records what was compiled.
"""

from __future__ import annotations

import _imp
import hashlib
import importlib.machinery
import importlib.util
import marshal
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from tpm.errors import MeasurementError

_HEADER = 16                    # magic, flags, then mtime+size or the source hash (PEP 552)


class NotMeasured(ImportError):
    """A module of a measured package whose source is not the one measured."""


def manifest_digests(code_paths: Iterable[Path | str], manifest: bytes) -> dict[Path, str]:
    """{resolved path of a measured file: its SHA-256 hex} from a code manifest
    (``tpm.measure.code_manifest``: names relative to each measured path's parent)."""
    parents = {Path(p).absolute().name: Path(p).absolute().parent for p in code_paths}
    out: dict[Path, str] = {}
    for line in manifest.decode("utf-8").splitlines()[1:]:
        digest, _, name = line.partition("  ")
        top = name.split("/", 1)[0]
        if top in parents:                  # (native: lines name no package)
            out[(parents[top] / name).resolve()] = digest
    return out


def would_load_pyc(source: str) -> bytes | None:
    """The pyc that Python's source loader would run instead of ``source`` (a
    path as the import system names it), or None if it would compile the
    source: the same checks, in the same order, as ``SourceLoader.get_code``."""
    try:
        cached = importlib.util.cache_from_source(source)
    except (NotImplementedError, ValueError):
        return None
    try:
        st = os.stat(source)
        with open(cached, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < _HEADER or data[:4] != importlib.util.MAGIC_NUMBER:
        return None
    flags = int.from_bytes(data[4:8], "little")
    if flags & ~0b11:
        return None                         # invalid flags: the loader falls back to the source
    if flags & 0b1:                         # hash based
        mode = getattr(_imp, "check_hash_based_pycs", "default")
        if mode != "never" and (flags & 0b10 or mode == "always"):
            try:
                with open(source, "rb") as f:
                    if importlib.util.source_hash(f.read()) != data[8:16]:
                        return None
            except OSError:
                return None
        return data                         # unchecked: run whatever it holds
    if (int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
            or int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF):
        return None                         # stale: recompiled from the source
    return data


def _measured_source(path: Path, digests: dict[Path, str]) -> bytes:
    """The bytes of measured file ``path``, checked against the manifest."""
    want = digests.get(path.resolve())
    if want is None:
        raise NotMeasured(f"{path} was not measured into PCR 8 when this VMM started "
                          f"(a file added since): refusing to import it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NotMeasured(f"cannot read {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise NotMeasured(f"{path} changed since this VMM measured it into PCR 8: refusing to import it "
                          f"(restart the VMM to measure and run the new code)")
    return data


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path.is_relative_to(r) for r in roots)


def check_loaded(code_paths: Iterable[Path | str], digests: dict[Path, str], modules=None) -> int:
    """Refuse (MeasurementError) if an imported module of the measured packages
    runs bytecode that is not its measured source compiled.  Returns how many
    modules ran from a pyc (each one checked)."""
    roots = [Path(p).resolve() for p in code_paths]
    checked = 0
    for name, mod in list((sys.modules if modules is None else modules).items()):
        spec = getattr(mod, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py") or isinstance(spec.loader, MeasuredLoader):
            continue
        path = Path(origin)
        if not _under(path.resolve(), roots):
            continue
        data = would_load_pyc(origin)
        if data is None:
            continue
        pyc = importlib.util.cache_from_source(origin)
        try:
            source = _measured_source(path, digests)
        except NotMeasured as exc:
            raise MeasurementError(str(exc)) from None
        try:
            ran = marshal.loads(memoryview(data)[_HEADER:])
        except (EOFError, ValueError, TypeError):
            ran = None
        if ran != compile(source, origin, "exec", dont_inherit=True):
            raise MeasurementError(f"{pyc} holds code that is not {origin} compiled, and Python ran it for "
                                   f"module {name} (a forged or foreign bytecode file: what it does was "
                                   f"never measured); remove it and start again")
        checked += 1
    return checked


class MeasuredLoader(importlib.machinery.SourceFileLoader):
    """A source loader that never reads bytecode and runs only measured bytes."""

    def __init__(self, fullname: str, path: str, digests: dict[Path, str]):
        super().__init__(fullname, path)
        self._digests = digests

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        return self.source_to_code(_measured_source(Path(path), self._digests), path)


class MeasuredFinder:
    """First on ``sys.meta_path``: the measured packages' modules get a
    :class:`MeasuredLoader`; anything else of theirs that Python would import
    (a sourceless or extension module) is refused."""

    def __init__(self):
        self._lock = threading.Lock()
        self.roots: dict[str, Path] = {}    # top-level package name: its resolved directory
        self.digests: dict[Path, str] = {}

    def update(self, code_paths: Iterable[Path | str], digests: dict[Path, str]) -> None:
        with self._lock:
            self.roots = {Path(p).absolute().name: Path(p).resolve() for p in code_paths}
            self.digests = dict(digests)

    def find_spec(self, fullname, path=None, target=None):
        root = self.roots.get(fullname.partition(".")[0])
        if root is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not _under(Path(spec.origin).resolve(), [root]):
            return spec
        if type(spec.loader) is not importlib.machinery.SourceFileLoader:
            raise NotMeasured(f"{spec.origin}: not a Python source file, so not measured into PCR 8: "
                              f"refusing to import it as {fullname}")
        spec.loader = MeasuredLoader(fullname, spec.origin, self.digests)
        return spec


_FINDER = MeasuredFinder()


def install(code_paths: Iterable[Path | str], digests: dict[Path, str]) -> MeasuredFinder:
    """From now on, imports from the measured packages run only measured source
    (this process's last measurement: a process that measures twice, like the
    test suite, checks against the latest)."""
    code_paths = list(code_paths)
    _FINDER.update(code_paths, digests)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return _FINDER


def guard(code_paths: Iterable[Path | str], manifest: bytes) -> int:
    """Both checks, after a measurement with code manifest ``manifest``."""
    code_paths = list(code_paths)
    digests = manifest_digests(code_paths, manifest)
    checked = check_loaded(code_paths, digests)
    install(code_paths, digests)
    return checked
