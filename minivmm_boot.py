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

So nothing of the measured packages is ever loaded from bytecode.  This module
sits outside them and imports only the standard library; the ``minivmm``
command (and ``python -m minivmm_boot``) installs :class:`BootFinder` before the
first import of a measured package.  From then on, every module of
``minivmm``, ``guests``, ``migrate``, ``tpm`` and ``tui`` is compiled from its
source, and the SHA-256 of exactly the bytes compiled is recorded.  When the
VMM measures itself, ``migrate.codeguard`` compares those records with the
manifest about to be extended (refusing a module whose source changed between
its import and the measurement), then :meth:`BootFinder.seal` makes every later
import check its source against the manifest (refusing a file changed or added
since).  A VMM not started this way refuses to measure itself.

What this file cannot vouch for is itself: it runs before anything can be
measured, like the interpreter, the standard library and site-packages, which
load it (docs/tpm.md, "the code that runs is the code measured").
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import sys
import threading

#: The top-level packages whose files PCR 8 measures (migrate.measure.code_paths).
MEASURED = frozenset({"minivmm", "guests", "migrate", "tpm", "tui"})


class NotMeasured(ImportError):
    """A module of a measured package that is not measured source."""


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
    """First on ``sys.meta_path``: finds a measured package's module with the
    finders after it, then loads it with a :class:`BootLoader`; anything else
    Python would import under those names (an extension module, a sourceless
    pyc, a namespace directory) is refused."""

    def __init__(self):
        self._lock = threading.Lock()
        self.compiled: dict[str, set[str]] = {}   # real path: SHA-256 hex of every version compiled
        self.digests: dict[str, str] | None = None  # after seal(): the manifest's

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in MEASURED:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, BootFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if type(spec.loader) is not importlib.machinery.SourceFileLoader:
            raise NotMeasured(f"{spec.origin or fullname}: not a Python source file that PCR 8 measures "
                              f"(loader {type(spec.loader).__name__}): refusing to import {fullname}")
        spec.loader = BootLoader(fullname, spec.origin, self)
        return spec

    def compiling(self, path: str, data: bytes) -> None:
        key = os.path.realpath(path)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self.digests is None:
                self.compiled.setdefault(key, set()).add(digest)
                return
            want = self.digests.get(key)
        if want is None:
            raise NotMeasured(f"{path} was not measured into PCR 8 when this VMM started "
                              f"(a file added since): refusing to import it")
        if digest != want:
            raise NotMeasured(f"{path} changed since this VMM measured it into PCR 8: refusing to import it "
                              f"(restart the VMM to measure and run the new code)")

    def seal(self, digests: dict[str, str]) -> None:
        """Check what was compiled against ``digests`` ({real path: SHA-256 hex}
        of the manifest about to be extended) and check every later import
        against them.  NotMeasured names the first module that differs."""
        with self._lock:
            for key, seen in sorted(self.compiled.items()):
                want = digests.get(key)
                if want is None:
                    raise NotMeasured(f"{key} runs in this VMM but is not in its code manifest")
                if seen != {want}:
                    raise NotMeasured(f"{key} changed between its import and the measurement: the code "
                                      f"running is not the code measured; start the VMM again")
            self.digests = dict(digests)


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
    packages, unmeasured (hostile review).  Drop it; a checkout that is not
    installed is found at the end of the path instead, after the platform's."""
    if sys.path and os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.getcwd()):
        del sys.path[0]
        here = os.path.dirname(os.path.realpath(__file__))
        if here not in (os.path.realpath(p or os.curdir) for p in sys.path):
            sys.path.append(here)


def main() -> int:
    """The ``minivmm`` command."""
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
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("minivmm_boot", sys.modules[__name__])     # one finder, whoever imports us
    _untrusted_path_entry()
    if sys.argv[1:2] == ["-m"] and len(sys.argv) > 2:
        sys.exit(_run_module(sys.argv[2:]))
    sys.exit(main())
