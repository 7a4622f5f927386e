"""The code a measured VMM runs is the code it measured (minivmm_boot.py, migrate/codeguard.py).

The attacks (two hostile reviews): a forged pyc beside an untouched measured
``X.py``, which Python runs instead of it (a timestamp pyc matching the
source, a checked hash pyc, an unchecked hash pyc), including one that deletes
itself once it ran; a module shadowing the standard library from the current
directory of ``python -m``; a planted distribution declaring a ``minivmm.commands``
entry point.  Each test first shows the attack really runs code without the
defence, then that a VMM started through its launcher does not run it."""

from __future__ import annotations

import importlib.util
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minivmm_boot
from migrate.codeguard import manifest_digests
from minivmm_boot import BootFinder, NotMeasured
from tpm.measure import code_manifest

ROOT = Path(__file__).resolve().parents[2]


def pyc(code, source: Path, kind: str) -> bytes:
    """A pyc holding ``code`` that Python takes for ``source``'s: ``kind`` is
    timestamp (source mtime and size), checked (source hash) or unchecked."""
    if kind == "timestamp":
        st = source.stat()
        head = (0).to_bytes(4, "little") + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") \
            + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        flags = 0b11 if kind == "checked" else 0b01
        head = flags.to_bytes(4, "little") + importlib.util.source_hash(source.read_bytes())
    return importlib.util.MAGIC_NUMBER + head + marshal.dumps(code)


def forge(source: Path, cached: Path, kind: str, payload: str) -> None:
    """The real module, then ``payload``, then the pyc deletes itself (so that
    nothing on disk shows it ran: a check of the pycs afterwards finds none)."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    extra = f"\n{payload}\nimport os as _os\n_os.remove({str(cached)!r})\n"
    code = compile(source.read_bytes() + extra.encode(), str(source), "exec", dont_inherit=True)
    cached.write_bytes(pyc(code, source, kind))


def cache_under(prefix: Path, source: Path, monkeypatch) -> Path:
    """Where a process with PYTHONPYCACHEPREFIX=prefix looks for ``source``'s pyc."""
    with monkeypatch.context() as m:
        m.setattr(sys, "pycache_prefix", str(prefix))
        return Path(importlib.util.cache_from_source(str(source)))


def run(argv, *, cwd=ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def script(text: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(text)]


# ------------------------------------------------------------ the real VMM
@pytest.mark.parametrize("kind", ["timestamp", "checked", "unchecked"])
def test_a_forged_pyc_never_runs_in_a_vmm_started_through_its_launcher(tmp_path, monkeypatch, kind):
    """A forged, self-deleting pyc for migrate/wire.py (which every VMM start
    imports before it measures itself).  Imported the usual way it runs; a VMM
    started as ``python -m minivmm_boot`` (what the ``minivmm`` command and every
    VMM this project starts run) compiles the source."""
    import migrate.wire
    source = Path(migrate.wire.__file__).resolve()
    prefix, marker = tmp_path / "pycache", tmp_path / "forged-code-ran"
    payload = f"open({str(marker)!r}, 'w').write('pid %d' % __import__('os').getpid())"
    cached = cache_under(prefix, source, monkeypatch)
    forge(source, cached, kind, payload)
    attack = run(script("import migrate.wire"), PYTHONPYCACHEPREFIX=str(prefix))
    assert attack.returncode == 0, attack.stderr
    assert marker.exists() and not cached.exists(), "the attack did not take: the forged pyc was not run"
    marker.unlink()
    forge(source, cached, kind, payload)
    vmm = run([sys.executable, "-m", "minivmm_boot", "serve", "--listen", "256.0.0.1:1", "--timeout", "3",
               "--tpm-dir", str(tmp_path / "tpm"), "--plain"], PYTHONPYCACHEPREFIX=str(prefix))
    assert "measured into TPM" in vmm.stdout + vmm.stderr, vmm.stdout + vmm.stderr
    assert not marker.exists(), "the forged bytecode ran inside a measured VMM"
    assert cached.exists(), "the VMM read the forged pyc"


def test_a_process_not_started_through_the_launcher_refuses_to_measure_itself(tmp_path):
    out = run(script(f"""
        from migrate.measure import measure_start
        from tpm import SoftTpm
        from tpm.errors import MeasurementError
        try:
            measure_start({str(tmp_path / 'tpm')!r}, {{"role": "source"}})
            print("MEASURED")
        except MeasurementError as exc:
            print("REFUSED", exc)
        print("PCR8", SoftTpm.open({str(tmp_path / 'tpm')!r}, startup=None).read_pcr(8).hex())
    """))
    assert out.returncode == 0, out.stderr
    assert "REFUSED this process did not start through the VMM's launcher" in out.stdout
    assert "PCR8 " + "00" * 32 in out.stdout, "a refused start extended PCR 8"


def test_modules_imported_before_the_launcher_refuse_the_measurement(tmp_path):
    out = run(script(f"""
        import migrate.wire
        import minivmm_boot
        minivmm_boot.install()
        from migrate.measure import measure_start
        from tpm.errors import MeasurementError
        try:
            measure_start({str(tmp_path / 'tpm')!r}, {{"role": "source"}})
            print("MEASURED")
        except MeasurementError as exc:
            print("REFUSED", exc)
    """))
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "imported before the launcher" in out.stdout, out.stdout


def test_python_m_minivmm_restarts_through_the_launcher(tmp_path, monkeypatch):
    """``python -m minivmm`` has imported the ``minivmm`` package the usual way
    before its ``__main__`` runs: it must not measure that process, but start
    again through the launcher (the forged ``minivmm/__init__`` pyc ran once, in
    a process that then measured nothing)."""
    import minivmm
    source = Path(minivmm.__file__).resolve()
    prefix, marker = tmp_path / "pycache", tmp_path / "forged-code-ran"
    cached = cache_under(prefix, source, monkeypatch)
    forge(source, cached, "unchecked", f"open({str(marker)!r}, 'a').write('ran\\n')")
    vmm = run([sys.executable, "-m", "minivmm", "serve", "--listen", "256.0.0.1:1", "--timeout", "3",
               "--tpm-dir", str(tmp_path / "tpm"), "--plain"], PYTHONPYCACHEPREFIX=str(prefix))
    assert "measured into TPM" in vmm.stdout + vmm.stderr, vmm.stdout + vmm.stderr
    assert marker.read_text() == "ran\n", "the forged package __init__ ran again after the restart"


def test_the_current_directory_of_python_m_shadows_nothing(tmp_path):
    """``python -m`` puts the current directory first on sys.path: a planted
    ``argparse.py`` there ran inside a measured VMM (hostile review)."""
    marker = tmp_path / "shadow-ran"
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          f"raise ImportError('planted')\n")
    attack = run(script("import argparse"), cwd=tmp_path)
    assert marker.exists(), "the attack did not take"
    marker.unlink()
    vmm = run([sys.executable, "-m", "minivmm_boot", "--help"], cwd=tmp_path)
    assert vmm.returncode == 0, vmm.stderr
    assert not marker.exists(), "a file of the current directory shadowed the standard library"
    assert attack.returncode != 0


def test_a_planted_entry_point_is_not_loaded(tmp_path):
    """A distribution on sys.path declaring a ``minivmm.commands`` entry point:
    the CLI loads every entry point of that group at start, before measuring."""
    marker = tmp_path / "entry-point-ran"
    info = tmp_path / "zzevil-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zzevil\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[minivmm.commands]\nzzevil = zzevil_cmd:register\n")
    (tmp_path / "zzevil_cmd.py").write_text(f"def register(sub):\n    open({str(marker)!r}, 'w').write('ran')\n")
    attack = run(script("from importlib.metadata import entry_points\n"
                        "[ep.load()(None) for ep in entry_points(group='minivmm.commands') if ep.name == 'zzevil']"),
                 PYTHONPATH=str(tmp_path))
    assert attack.returncode == 0 and marker.exists(), attack.stderr
    marker.unlink()
    vmm = run([sys.executable, "-m", "minivmm_boot", "--help"], PYTHONPATH=str(tmp_path))
    assert vmm.returncode == 0 and "serve" in vmm.stdout, vmm.stderr
    assert not marker.exists()
    assert "ignoring entry point zzevil = zzevil_cmd:register" in vmm.stderr


# ------------------------------------------------------------ a package of our own
@pytest.fixture
def make(tmp_path, monkeypatch):
    """A package ``guardpkg`` in tmp_path, importable; ``make()`` returns a boot
    finder for it made now (hashing its sources), first on sys.meta_path."""
    p = tmp_path / "guardpkg"
    p.mkdir()
    (p / "__init__.py").write_text("")
    for name in ("a", "b", "c"):
        (p / f"{name}.py").write_text(f"NAME = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(minivmm_boot, "MEASURED", minivmm_boot.MEASURED | {"guardpkg"})

    def make():
        finder = BootFinder({"guardpkg": os.path.realpath(p)})
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
        return p, finder
    make.path = p
    yield make
    for name in [m for m in sys.modules if m.partition(".")[0] == "guardpkg"]:
        del sys.modules[name]


def _digests(p: Path):
    return manifest_digests([p], code_manifest([p]))


def test_the_boot_finder_compiles_source_only_from_files_hashed_at_the_start(make):
    p, finder = make()
    a = p / "a.py"
    assert finder.digests[os.path.realpath(a)] == _digests(p)[os.path.realpath(a)]
    cached = Path(importlib.util.cache_from_source(str(a)))
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(pyc(compile("NAME = 'forged'\n", str(a), "exec"), a, "unchecked"))
    import guardpkg.a
    assert guardpkg.a.NAME == "a" and type(guardpkg.a.__spec__.loader).__name__ == "BootLoader"
    assert os.path.realpath(a) in finder.compiled
    finder.seal(_digests(p))
    assert finder.sealed


def test_a_file_changed_or_added_after_the_start_never_runs(make):
    p, finder = make()
    (p / "b.py").write_text("NAME = 'changed after the start'\n")
    with pytest.raises(NotMeasured, match="changed since this VMM started"):
        import guardpkg.b  # noqa: F401
    (p / "d.py").write_text("NAME = 'added after the start'\n")
    with pytest.raises(NotMeasured, match="not one of the VMM's source files hashed when it started"):
        import guardpkg.d  # noqa: F401
    import guardpkg.c
    assert guardpkg.c.NAME == "c"


def test_a_module_planted_in_pycache_never_runs(make):
    """The manifest skips __pycache__; an entry point naming
    ``guardpkg.__pycache__`` imported a package planted there (hostile review)."""
    p, finder = make()
    (p / "__pycache__").mkdir()
    (p / "__pycache__" / "__init__.py").write_text("NAME = 'planted'\n")
    with pytest.raises(NotMeasured, match="not one of the VMM's source files"):
        import guardpkg.__pycache__  # noqa: F401


def test_a_source_changed_before_the_start_and_back_before_the_measurement_is_refused(make):
    """(Third hostile review's self-restoring source, minus its tampering with the
    finder's memory, which no check in the same process can stop: docs/tpm.md.)"""
    b = make.path / "b.py"
    genuine = b.read_text()
    b.write_text(genuine + "RAN = True\n")             # changed before the start
    p, finder = make()
    import guardpkg.b
    assert guardpkg.b.RAN                               # ... it ran,
    b.write_text(genuine)                               # ... and put itself back
    with pytest.raises(NotMeasured, match="changed between this VMM's start and its measurement"):
        finder.seal(_digests(p))
    assert not finder.sealed


def test_a_sourceless_module_under_a_measured_name_is_refused(make):
    """(The measured walk refuses a pyc outside __pycache__ too; this is the
    import's own refusal, for anything Python could load that is not source.)"""
    p, finder = make()
    (p / "e.pyc").write_bytes(pyc(compile("NAME = 'e'\n", "e.py", "exec"), p / "a.py", "unchecked"))
    with pytest.raises(NotMeasured, match="not a Python source file"):
        import guardpkg.e  # noqa: F401


def test_the_suite_measures_through_the_launcher(tmp_path):
    """tests/conftest.py installs the launcher's finder first, as the command does:
    every measured module of this process came through it."""
    from migrate.measure import code_paths, measure_start
    assert minivmm_boot.active() is not None and minivmm_boot.early_modules() == []
    measure_start(tmp_path / "a", {"role": "source"})
    assert Path(minivmm_boot.__file__) in code_paths()
    assert minivmm_boot.active().sealed


def test_the_launcher_guards_exactly_the_packages_pcr8_measures():
    """Two lists name the measured packages: ``minivmm_boot.MEASURED`` (loaded
    source-only, the only ones an entry point may name) and
    ``migrate.measure.code_paths()`` (hashed into PCR 8).  A package in the
    second only would be measured but could run from a planted pyc; in the
    first only, it would run source-only but unmeasured."""
    from migrate.measure import code_paths
    paths = code_paths()
    assert {p.name for p in paths if p.is_dir()} == set(minivmm_boot.MEASURED)
    assert [p.name for p in paths if not p.is_dir()] == ["minivmm_boot.py"]


def test_a_tool_run_as_python_m_restarts_through_the_launcher(tmp_path):
    """``python -m tui.bench`` measures VMMs in its own process: run the usual
    way, its package was imported before it could install anything, so it
    restarts through the launcher (``minivmm_boot.relaunch``), which imports it
    and the VMM's packages source-only."""
    (tmp_path / "probe_tool.py").write_text(textwrap.dedent("""
        import sys
        import minivmm_boot
        if __name__ == "__main__":
            minivmm_boot.relaunch("probe_tool")
            import migrate.measure
            print("ACTIVE", minivmm_boot.active() is not None, type(migrate.measure.__spec__.loader).__name__,
                  minivmm_boot.early_modules(), sys.argv[1:])
            import os
            print("PATH", any(os.path.realpath(p or ".") == os.path.realpath(os.getcwd()) for p in sys.path),
                  all(os.path.isabs(p) for p in sys.path))
    """))
    out = run([sys.executable, "-m", "probe_tool", "--x", "1"], PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ACTIVE True BootLoader [] ['--x', '1']" in out.stdout, out.stdout
    # neither the current directory nor the checkout's root is on the path: a
    # planted bcrypt.py there answered cryptography's optional import (hostile review)
    assert "PATH False True" in out.stdout and str(ROOT) not in out.stdout


def test_the_install_puts_no_relative_entry_on_every_interpreters_path():
    """Namespace packages in the layout made an editable install add a relative
    sys.path entry to *every* interpreter, resolved against its current
    directory, before any code of ours runs: a planted sitecustomize.py ran at
    start (hostile review).  pyproject.toml: namespaces = false."""
    out = run(script("import sys, os; print([p for p in sys.path[1:] if not os.path.isabs(p)])"), cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout


def test_the_console_script_directory_shadows_nothing(tmp_path):
    """The ``minivmm`` console script's directory is first on sys.path: a planted
    ``argparse.py`` beside it ran (hostile review).  A copy of the script in a
    directory of our own, with the plant beside it."""
    script = Path(sys.executable).parent / "minivmm"
    if not script.exists():
        pytest.skip("no minivmm console script beside this interpreter")
    marker = tmp_path / "shadow-ran"
    (tmp_path / "minivmm").write_text(script.read_text())
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          f"raise ImportError('planted')\n")
    out = run([sys.executable, str(tmp_path / "minivmm"), "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr
    assert not marker.exists(), "a file beside the console script shadowed the standard library"


def test_a_refusal_is_not_taken_for_a_missing_optional_package(make):
    """A measured module's ``try: import X / except ImportError`` (an optional
    extra, e.g. the bench plots) must not quietly take a refused file for a
    missing package (fourth hostile review)."""
    p, finder = make()
    (p / "b.py").write_text("NAME = 'changed after the start'\n")
    with pytest.raises(NotMeasured):
        try:
            import guardpkg.b  # noqa: F401
        except ImportError:
            pytest.fail("the refusal was caught as an ImportError")
