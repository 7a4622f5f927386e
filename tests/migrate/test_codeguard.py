"""The code a measured VMM runs is the code it measured (migrate/codeguard.py).

The attack: leave a measured ``X.py`` alone and put other code in the pyc that
Python runs instead (its header matching ``X.py``, or an unchecked hash pyc).
PCR 8 measures sources, so it stayed the approved value while the VMM ran the
forged code (hostile review).  Each test first shows the forged code runs, then
that the VMM refuses to start with it, or does not run it."""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from migrate import codeguard
from migrate.codeguard import MeasuredFinder, NotMeasured, check_loaded, manifest_digests, would_load_pyc
from tpm.errors import MeasurementError
from tpm.measure import code_manifest

ROOT = Path(__file__).resolve().parents[2]


def pyc(code, source: Path, kind: str) -> bytes:
    """A pyc holding ``code`` that Python takes for ``source``'s: ``kind`` is
    timestamp (source mtime and size), checked (source hash) or unchecked."""
    body = marshal.dumps(code)
    if kind == "timestamp":
        st = source.stat()
        head = (0).to_bytes(4, "little") + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") \
            + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        flags = 0b11 if kind == "checked" else 0b01
        head = flags.to_bytes(4, "little") + importlib.util.source_hash(source.read_bytes())
    return importlib.util.MAGIC_NUMBER + head + body


def forge(source: Path, cached: Path, kind: str, extra: str = "FORGED = 'yes'\n") -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    code = compile(source.read_bytes() + b"\n" + extra.encode(), str(source), "exec", dont_inherit=True)
    cached.write_bytes(pyc(code, source, kind))


def cache_under(prefix: Path, source: Path, monkeypatch) -> Path:
    """Where a process with PYTHONPYCACHEPREFIX=prefix looks for ``source``'s pyc."""
    with monkeypatch.context() as m:
        m.setattr(sys, "pycache_prefix", str(prefix))
        return Path(importlib.util.cache_from_source(str(source)))


def child(script: str, prefix: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------ the real VMM
@pytest.mark.parametrize("kind", ["timestamp", "checked", "unchecked"])
def test_a_forged_pyc_of_a_module_the_start_imported_refuses_the_start(tmp_path, monkeypatch, kind):
    """A forged pyc for migrate/wire.py (imported before the VMM measures itself):
    the forged code runs, so the start is refused, naming the file, and nothing
    is extended into PCR 8."""
    import migrate.wire
    source = Path(migrate.wire.__file__).resolve()
    prefix = tmp_path / "pycache"
    cached = cache_under(prefix, source, monkeypatch)
    forge(source, cached, kind)
    out = child(f"""
        import migrate.wire
        print("FORGED", getattr(migrate.wire, "FORGED", None))
        from migrate.measure import measure_start
        from tpm import SoftTpm
        from tpm.errors import MeasurementError
        try:
            measure_start({str(tmp_path / 'tpm')!r}, {{"role": "source"}})
            print("STARTED")
        except MeasurementError as exc:
            print("REFUSED", exc)
        print("PCR8", SoftTpm.open({str(tmp_path / 'tpm')!r}, startup=None).read_pcr(8).hex())
    """, prefix)
    assert out.returncode == 0, out.stderr
    assert "FORGED yes" in out.stdout, "the attack did not take: the forged pyc was not run"
    assert "STARTED" not in out.stdout
    assert "REFUSED" in out.stdout and str(cached) in out.stdout and "forged or foreign bytecode" in out.stdout
    assert "PCR8 " + "00" * 32 in out.stdout, "a refused start extended PCR 8"


def test_a_forged_pyc_of_a_module_imported_after_the_start_is_never_run(tmp_path, monkeypatch):
    """A module the VMM imports only later (migrate/report.py): after the
    measurement it is compiled from its measured source, the pyc never read."""
    import migrate.report
    source = Path(migrate.report.__file__).resolve()
    prefix = tmp_path / "pycache"
    forge(source, cache_under(prefix, source, monkeypatch), "unchecked")
    out = child(f"""
        import sys
        from migrate.measure import measure_start
        assert "migrate.report" not in sys.modules
        measure_start({str(tmp_path / 'tpm')!r}, {{"role": "source"}})
        import migrate.report
        print("FORGED", getattr(migrate.report, "FORGED", None), type(migrate.report.__spec__.loader).__name__)
    """, prefix)
    assert out.returncode == 0, out.stderr
    assert "FORGED None MeasuredLoader" in out.stdout


def test_genuine_bytecode_starts(tmp_path):
    """Pycs Python wrote itself for the measured sources pass the check (and
    are compared, not skipped)."""
    prefix = tmp_path / "pycache"
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    script = f"""
        from migrate import codeguard
        from migrate.measure import measure_start
        seen = []
        real = codeguard.check_loaded
        codeguard.check_loaded = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
        measure_start({str(tmp_path / 'tpm')!r}, {{"role": "source"}})
        print("CHECKED", seen[0])
    """
    for _ in range(2):          # the first run writes the pycs, the second runs them
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert int(out.stdout.split("CHECKED")[1]) >= 5, out.stdout


# ------------------------------------------------------------ a package of our own
@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A package ``guardpkg`` in tmp_path, importable, forgotten afterwards."""
    p = tmp_path / "guardpkg"
    p.mkdir()
    (p / "__init__.py").write_text("")
    for name in ("a", "b", "c"):
        (p / f"{name}.py").write_text(f"NAME = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    yield p
    for name in [m for m in sys.modules if m.partition(".")[0] == "guardpkg"]:
        del sys.modules[name]


def _digests(p: Path):
    return manifest_digests([p], code_manifest([p]))


def test_check_loaded_refuses_a_forged_pyc_and_passes_a_genuine_or_stale_one(pkg):
    digests = _digests(pkg)
    import guardpkg.a
    import guardpkg.b
    assert (guardpkg.a.NAME, guardpkg.b.NAME) == ("a", "b")
    assert check_loaded([pkg], digests) == 0                # no pyc: the sources ran
    a, b = pkg / "a.py", pkg / "b.py"
    cached = Path(importlib.util.cache_from_source(str(a)))
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(pyc(compile(a.read_bytes(), str(a), "exec", dont_inherit=True), a, "timestamp"))
    assert check_loaded([pkg], digests) == 1                # genuine: compared, passed
    forge(a, cached, "timestamp")
    with pytest.raises(MeasurementError, match="module guardpkg.a .a forged or foreign bytecode"):
        check_loaded([pkg], digests)
    st = a.stat()
    os.utime(a, (st.st_atime, st.st_mtime + 10))            # the header no longer matches:
    assert check_loaded([pkg], digests) == 0                # Python would recompile, nothing to check
    forge(b, Path(importlib.util.cache_from_source(str(b))), "checked", extra="X = 1\n")
    with pytest.raises(MeasurementError, match="guardpkg.b"):
        check_loaded([pkg], digests)


def test_would_load_pyc_follows_the_source_loader(pkg):
    a = pkg / "a.py"
    cached = Path(importlib.util.cache_from_source(str(a)))
    cached.parent.mkdir(exist_ok=True)
    code = compile("NAME = 'forged'\n", str(a), "exec")
    good = pyc(code, a, "timestamp")
    for data, loads in ((good, True), (good[:12], False), (b"\0\0\0\0" + good[4:], False),
                        (good[:4] + (4).to_bytes(4, "little") + good[8:], False),    # unknown flag bit
                        (pyc(code, a, "unchecked")[:8] + b"\0" * 8 + good[16:], True),  # unchecked: any hash
                        (pyc(code, a, "checked")[:8] + b"\0" * 8 + good[16:], False)):  # checked: wrong hash
        cached.write_bytes(data)
        assert (would_load_pyc(str(a)) is not None) == loads, data[:16]
        for name in [m for m in sys.modules if m.partition(".")[0] == "guardpkg"]:
            del sys.modules[name]
        import guardpkg.a                                   # what Python itself does with it
        assert (guardpkg.a.NAME == "forged") == loads


def test_after_the_measurement_imports_run_only_measured_source(pkg, monkeypatch):
    digests = _digests(pkg)
    finder = MeasuredFinder()
    finder.update([pkg], digests)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    forge(pkg / "a.py", Path(importlib.util.cache_from_source(str(pkg / "a.py"))), "unchecked")
    import guardpkg.a
    assert guardpkg.a.NAME == "a" and not hasattr(guardpkg.a, "FORGED")
    (pkg / "b.py").write_text("NAME = 'changed after the measurement'\n")
    with pytest.raises(NotMeasured, match="changed since this VMM measured it"):
        import guardpkg.b  # noqa: F401
    (pkg / "d.py").write_text("NAME = 'added after the measurement'\n")
    with pytest.raises(NotMeasured, match="was not measured"):
        import guardpkg.d  # noqa: F401
    import guardpkg.c
    assert guardpkg.c.NAME == "c"
    assert hashlib.sha256((pkg / "c.py").read_bytes()).hexdigest() == digests[(pkg / "c.py").resolve()]


def test_the_start_installs_the_guard_once(tmp_path):
    from migrate.measure import code_paths, measure_start
    measure_start(tmp_path / "a", {"role": "source"})
    measure_start(tmp_path / "b", {"role": "source"})
    assert sum(isinstance(f, MeasuredFinder) for f in sys.meta_path) == 1
    assert sys.meta_path[0] is codeguard._FINDER
    assert set(codeguard._FINDER.roots) == {p.name for p in code_paths()}
