"""The project as a package: a built wheel carries everything (guest sources
included) and the tool works from any directory.

The wheel test installs into a fresh virtual environment outside the checkout.
Its dependencies (unicorn, keystone, ...) come from this environment's
site-packages through a ``.pth`` line: a ``.pth`` inside a directory that is
not a site directory is not itself processed, so this environment's editable
install of minivmm (its own ``.pth`` and finder) stays inert there; the test
then checks that every project package was imported from the fresh
environment, i.e. from the wheel's files alone.
"""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minivmm", "guests", "tpm", "migrate")


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("minivmm-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_carries_the_guest_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "guests").rglob("*.s")):
        assert str(src.relative_to(ROOT)) in names, f"{src.name} is missing from the wheel"
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names


@pytest.mark.slow
def test_an_installed_wheel_runs_a_guest_and_the_demo_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = _site_packages(python)
    (site / "deps-from-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Without PYTHONPATH for pip too: a checkout on it (its minivmm.egg-info, left by the
    # wheel build) would tell pip that minivmm is installed already, and it would install nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["MINIVMM_TPM_STATE"] = str(work / "tpm-state")

    where = subprocess.run([str(python), "-c", "import " + ", ".join(PACKAGES) + "; print('\\n'.join("
                            + " + ".join(f"[{p}.__file__]" for p in PACKAGES) + "))"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(site), f"{path} is not from the installed wheel"

    run = subprocess.run([str(venv / "bin" / "minivmm"), "run", "hello"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "hello, world\n" in run.stdout

    demo = subprocess.run([str(venv / "bin" / "minivmm"), "demo"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "B | " in demo.stdout and "VMM B exited with status 0" in demo.stdout


@pytest.mark.parametrize("shadow", ["tpm", "migrate", "guests"])
def test_python_m_minivmm_ignores_a_same_named_folder_in_the_current_directory(tmp_path, shadow):
    (tmp_path / shadow).mkdir()
    (tmp_path / shadow / "notes.txt").write_text("a user's own folder, not a package\n")
    out = subprocess.run([sys.executable, "-m", "minivmm", "run", "hello"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hello, world\n" in out.stdout
    # migrate's commands (loaded through the entry point) are there too
    helped = subprocess.run([sys.executable, "-m", "minivmm", "serve", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr


def test_python_m_minivmm_ignores_a_same_named_module_in_the_current_directory(tmp_path):
    (tmp_path / "tpm.py").write_text("raise SystemExit('the wrong tpm was imported')\n")
    out = subprocess.run([sys.executable, "-m", "minivmm", "serve", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
