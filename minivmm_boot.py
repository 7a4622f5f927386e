"""The VMM's launcher: from the first import on, its packages run only source it can measure.

A VMM measures the files of its packages into PCR 8 (``migrate/measure.py``),
but Python does not always run a module's source: it runs
``__pycache__/X.cpython-311.pyc`` instead whenever that file's header says it
is current (the source's mtime and size, or its hash, or an *unchecked* hash:
always), and nothing looks at the code inside.  A forged pyc beside an untouched
``X.py`` ran while PCR 8 kept its approved value (hostile review).  Checking the
pycs *after* they ran cannot work: the forged code runs first, in the same
process, and can delete itself or replace the checker (second hostile review);
code objects also compare equal across changed specialised opcodes.

So nothing of the measured packages is ever loaded from bytecode, and nothing
of them runs that was not hashed before any of it ran.  This module sits
outside them and imports only the standard library; the ``minivmm`` command
(and ``python -m minivmm_boot``) installs :class:`BootFinder` before the first
import of a measured package.  The finder first hashes every source file of
``minivmm``, ``guests``, ``migrate``, ``tpm`` and ``tui``; from then on a module
of theirs is compiled from its source, and only if that file was hashed and
still has its hash (a file planted or changed since is refused before it
runs).  When the VMM measures itself, ``migrate.codeguard`` refuses unless the
manifest about to be extended holds exactly those hashes.  A VMM not started
this way refuses to measure itself.

Recording in memory what ran and checking it later is not enough: code that
runs first, in this process, can rewrite the record (third hostile review: a
source that changed itself back after it ran).  The same holds for any code of
the measured packages that is *changed on disk before the start*: it runs
before the measurement and could lie to it -- as a changed ``tpm/measure.py``
could, with no bytecode at all.  A VMM that measures itself cannot catch that;
a loader that measures it before it runs (a real measured boot) would
(docs/tpm.md).

What this file cannot vouch for is itself: it runs before anything can be
measured, like the interpreter, the standard library and site-packages, which
load it (docs/tpm.md, "the code that runs is the code measured").
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading

#: The top-level packages whose files PCR 8 measures (migrate.measure.code_paths).
MEASURED = frozenset({"minivmm", "guests", "migrate", "tpm", "tui"})


class NotMeasured(RuntimeError):
    """A module of a measured package that is not measured source.  Not an
    ImportError on purpose: a measured module's ``except ImportError`` fallback
    (an optional extra) must not quietly take this for a missing package."""


class BootLoader(importlib.machinery.SourceFileLoader):
    """Compiles the source, never reads or writes bytecode, and reports the
    bytes it compiled to its finder (which may refuse them)."""

    def __init__(self, fullname: str, path: str, finder: "BootFinder"):
        super().__init__(fullname, path)
        self._finder = finder

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        data = self.get_data(path)
        self._finder.compiling(path, data)
        return self.source_to_code(data, path)


class BootFinder:
    """First on ``sys.meta_path``: the measured packages' modules, loaded only
    from source files hashed when the finder was made.

    At creation, before any module of the measured packages runs, it finds
    each package's directory without importing it and hashes every ``.py``
    file under it (``__pycache__`` skipped, as the manifest skips it).  A
    module is loaded only if its file is one of those and still has that
    hash: a file added or changed since (a module planted in ``__pycache__``
    and named by an entry point; a source changed after the start) is refused
    before it runs, as is anything that is not a source file (an extension
    module, a sourceless pyc, a namespace directory)."""

    def __init__(self, roots: dict[str, str] | None = None):
        self._lock = threading.Lock()
        self.roots = dict(_locate_packages() if roots is None else roots)   # name: real dir
        self.digests = _hash_sources(self.roots.values())  # real path of each .py: SHA-256 hex
        self.compiled: set[str] = set()                     # real paths loaded so far
        self.sealed = False

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        root = self.roots.get(top)
        if top not in MEASURED or root is None:
            return None
        if fullname == top:
            init = os.path.join(root, "__init__.py")
            return importlib.util.spec_from_file_location(top, init, loader=BootLoader(top, init, self),
                                                          submodule_search_locations=[root])
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        if type(spec.loader) is not importlib.machinery.SourceFileLoader:
            raise NotMeasured(f"{spec.origin or fullname}: not a Python source file that PCR 8 measures "
                              f"(loader {type(spec.loader).__name__}): refusing to import {fullname}")
        spec.loader = BootLoader(fullname, spec.origin, self)
        return spec

    def compiling(self, path: str, data: bytes) -> None:
        key = os.path.realpath(path)
        want = self.digests.get(key)
        if want is None:
            raise NotMeasured(f"{path} is not one of the VMM's source files hashed when it started "
                              f"(added since, or outside its packages' sources, e.g. in __pycache__): "
                              f"refusing to import it")
        if hashlib.sha256(data).hexdigest() != want:
            raise NotMeasured(f"{path} changed since this VMM started: refusing to import it "
                              f"(start the VMM again to measure and run the new code)")
        with self._lock:
            self.compiled.add(key)

    def seal(self, manifest: dict[str, str]) -> None:
        """Refuse (NotMeasured) unless ``manifest`` ({real path: SHA-256 hex}, the
        code manifest about to be extended) holds exactly the sources hashed at
        the start: the code that ran, and will run, is the code measured."""
        roots = [r + os.sep for r in self.roots.values()]
        measured = {k: v for k, v in manifest.items() if k.endswith(".py") and k.startswith(tuple(roots))}
        for key in sorted(set(measured) | set(self.digests)):
            if measured.get(key) != self.digests.get(key):
                raise NotMeasured(f"{key} changed between this VMM's start and its measurement: the code "
                                  f"running is not the code measured; start the VMM again")
        self.sealed = True


def _locate_packages() -> dict[str, str]:
    """{name: real directory} of each measured package, found without importing
    it: the first regular package any finder (an editable install's, the path)
    offers, else one beside this file (a checkout not installed)."""
    here = os.path.dirname(os.path.realpath(__file__))
    found = {}
    for name in sorted(MEASURED):
        specs = (f.find_spec(name, None) for f in sys.meta_path
                 if not isinstance(f, BootFinder) and hasattr(f, "find_spec"))
        for spec in [*specs, importlib.machinery.PathFinder.find_spec(name, [here])]:
            if spec is not None and spec.origin and spec.origin.endswith("__init__.py") \
                    and type(spec.loader) is importlib.machinery.SourceFileLoader:
                found[name] = os.path.realpath(os.path.dirname(spec.origin))
                break
    return found


def _hash_sources(roots) -> dict[str, str]:
    digests = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    try:
                        with open(path, "rb") as fh:
                            digests[os.path.realpath(path)] = hashlib.sha256(fh.read()).hexdigest()
                    except OSError:
                        pass                    # unreadable: never importable through us
    return digests


_FINDER: BootFinder | None = None


def install() -> BootFinder:
    """Put the boot finder first on ``sys.meta_path`` (once per process)."""
    global _FINDER
    if _FINDER is None:
        _FINDER = BootFinder()
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return _FINDER


def active() -> BootFinder | None:
    """The boot finder, if :func:`install` ran."""
    return _FINDER if _FINDER in sys.meta_path else None


def early_modules() -> list[str]:
    """Measured-package modules imported without the boot finder (before it was installed)."""
    return sorted(name for name, mod in list(sys.modules.items())
                  if name.partition(".")[0] in MEASURED
                  and not isinstance(getattr(getattr(mod, "__spec__", None), "loader", None), BootLoader))


def _untrusted_path_entry() -> None:
    """``python -m`` puts the current directory first on ``sys.path``: a file
    there (``argparse.py``, ``tpm/``) would shadow the standard library or our
    packages, unmeasured (hostile review).  Drop it.  (The measured packages
    are found by the boot finder itself, even in a checkout not installed: the
    checkout's root never goes on the path, where a planted ``bcrypt.py`` would
    answer a dependency's optional import.)"""
    if sys.path and os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.getcwd()):
        del sys.path[0]
    _relative_entries()


def _relative_entries() -> None:
    """A relative ``sys.path`` entry is resolved against the current directory
    at each import: whatever is planted there answers (an editable install
    with namespace packages added one; hostile review).  Drop them."""
    sys.path[:] = [p for p in sys.path if p and os.path.isabs(p)]


def _script_directory() -> None:
    """A console script's own directory (``.venv/bin``) is first on ``sys.path``:
    nothing the VMM imports lives there, and a file planted there would shadow
    the standard library (hostile review).  Drop it."""
    if sys.path and sys.argv and sys.argv[0] and \
            os.path.realpath(sys.path[0] or os.curdir) == os.path.dirname(os.path.realpath(sys.argv[0])):
        del sys.path[0]


def main() -> int:
    """The ``minivmm`` command."""
    _script_directory()
    _relative_entries()
    install()
    from minivmm.cli import main as cli_main
    return cli_main()


def relaunch(module: str) -> None:
    """For a tool of the measured packages run as ``python -m MODULE`` (its
    package was imported the usual way before it ran): start it again through
    the launcher, in this process (``exec``).  Returns only if already launched."""
    if active() is None:
        os.execv(sys.executable, [sys.executable, "-m", "minivmm_boot", "-m", module, *sys.argv[1:]])


def _run_module(argv: list[str]) -> int:
    """``python -m minivmm_boot -m MODULE ARGS``: run MODULE as ``__main__``,
    its package imported through the launcher."""
    import runpy
    install()
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("minivmm_boot", sys.modules[__name__])     # one finder, whoever imports us
    _untrusted_path_entry()
    if sys.argv[1:2] == ["-m"] and len(sys.argv) > 2:
        sys.exit(_run_module(sys.argv[2:]))
    sys.exit(main())
