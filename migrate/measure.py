"""Issue 4, point 2: a VMM that starts to serve or to migrate measures itself
into its host's software TPM before it touches a guest.

What is measured (``tpm.measure.measure_vmm``, PCRs 8, 9, 10):

* code: the packages this VMM runs -- ``minivmm``, ``guests``, ``migrate``,
  ``tpm``, and ``tui`` when installed (the CLI loads its commands), and the
  launcher ``minivmm_boot.py`` -- as a manifest of content hashes (names relative to their
  common parent, so the install location does not matter), followed by the
  native libraries it loads, in this order: unicorn (the emulator), keystone
  (the assembler), capstone (the disassembler), cryptography's Rust/OpenSSL
  extension (the AEAD that seals protected pages) -- each the very file the
  imported module loaded (:func:`native_libraries`).  Not covered: the Python
  interpreter and its standard library, the Python files of the dependencies,
  numpy, libc (docs/tpm.md says why);
* config: the VMM's canonical configuration (role, run mode, timer, the
  pre-copy policy, timeouts, protocol version) -- not addresses or ports,
  which change from run to run without changing what the VMM does;
* policy: its protection policy (:data:`PROTECTION_POLICY`).

Each start is a TPM Reset (``startup="clear"``): the VMM's start is this
host's measured boot, so PCRs 8-10 hold exactly one measurement of it.  The
state directory defaults to ``$MINIVMM_TPM_STATE/<role>`` (or
``.minivmm-tpm/<role>``), one per role so that a source and a destination on
one machine have separate TPMs, as two hosts would.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import guests
import minivmm
import minivmm_boot
import tpm as tpm_pkg
from tpm import SoftTpm, measure_vmm, vmm_events
from tpm.errors import MeasurementError
from tpm.eventlog import Event
from tpm.measure import VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR

import migrate
from migrate import codeguard
from migrate.wire import VERSION

PROTECTION_POLICY = {"protection": "cloaking", "keys": "os.urandom", "migration": "plain",
                     "migration_protocol": VERSION}


def default_tpm_dir(role: str) -> Path:
    return Path(os.environ.get("MINIVMM_TPM_STATE", ".minivmm-tpm")) / role


def code_paths() -> list[Path]:
    """The measured packages, and the launcher (``minivmm_boot.py``) that loads
    them.  ``tui`` too: the CLI loads its commands through the ``minivmm.commands``
    entry point at every start, ``serve`` included, so its code runs in a measured
    VMM (a hostile review changed it and PCR 8 stayed the same).  Found, not
    imported: the VMM core never imports the TUI (or Textual)."""
    paths = [Path(p.__file__).parent for p in (minivmm, guests, migrate, tpm_pkg)]
    spec = importlib.util.find_spec("tui")
    if spec is not None and spec.submodule_search_locations:
        paths.append(Path(list(spec.submodule_search_locations)[0]))
    return paths + [Path(minivmm_boot.__file__)]     # the launcher runs in every VMM too


#: (label, module that loads the library): the measured order of the native libraries.
NATIVE_MODULES = (
    ("unicorn", "unicorn.unicorn_py3.unicorn"),  # ctypes: libunicorn.so.2
    ("keystone", "keystone.keystone"),  # ctypes: libkeystone.so
    ("capstone", "capstone"),  # ctypes: libcapstone.so (imported here: the VMM itself does not call it)
    ("cryptography", "cryptography.hazmat.bindings._rust"),  # extension module, OpenSSL inside
)


def _mapped_files() -> set[str] | None:
    """Files mapped into this process (Linux); None where /proc is not available."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return None


def _library_of(module_name: str) -> Path:
    """The shared object ``module_name`` brought into the process: the module's own file
    for an extension module, else the one ctypes library it holds from its package."""
    module = importlib.import_module(module_name)
    top = Path(sys.modules[module_name.split(".")[0]].__file__).resolve().parent
    file = Path(getattr(module, "__file__", "") or "")
    if file.suffix == ".so":
        return file.resolve()
    found = {Path(v._name).resolve() for v in vars(module).values()
             if isinstance(v, ctypes.CDLL) and v._name and Path(v._name).resolve().is_relative_to(top)}
    if len(found) != 1:
        raise MeasurementError(f"cannot tell which native library {module_name} loaded ({sorted(found)})")
    return found.pop()


def native_libraries() -> list[tuple[str, Path]]:
    """(label, path) of the native libraries the VMM runs, in the measured order.
    Each path is checked against the process's own mappings where Linux shows them,
    so the file measured is the file executed (as of loading)."""
    paths = [(label, _library_of(mod)) for label, mod in NATIVE_MODULES]
    libs = [(f"{label}/{path.name}", path) for label, path in paths]
    mapped = _mapped_files()
    if mapped is not None:
        for label, path in libs:
            if str(path) not in mapped:
                raise MeasurementError(f"native library {label} ({path}) is not mapped in this process")
    return libs


def expected_events(config: dict, policy: dict | None = None) -> list[Event]:
    """The events a VMM start with this config produces (code, config, policy), computed
    without a TPM: build an approval policy from them on any machine with this install."""
    policy = dict(PROTECTION_POLICY if policy is None else policy)
    return vmm_events(code_paths(), config, policy, native_libraries=native_libraries())


@dataclass(frozen=True)
class Measurement:
    tpm_dir: str
    pcrs: dict[int, str]
    config: dict
    policy: dict
    files: int

    def describe(self) -> str:
        return (f"measured into TPM {self.tpm_dir}: PCR 8 (code, {self.files} files) "
                f"{self.pcrs[VMM_CODE_PCR][:16]}..., PCR 9 (config) {self.pcrs[VMM_CONFIG_PCR][:16]}..., "
                f"PCR 10 (protection policy) {self.pcrs[VMM_POLICY_PCR][:16]}...")


def measure_start(tpm_dir: Path | str, config: dict, policy: dict | None = None) -> Measurement:
    policy = dict(PROTECTION_POLICY if policy is None else policy)
    tpm = SoftTpm.open(tpm_dir, startup="clear")
    paths = code_paths()
    # Before anything is extended: every module imported so far was compiled from
    # the source measured now, and later imports will be (migrate/codeguard.py).
    events = measure_vmm(tpm, paths, config, policy, native_libraries=native_libraries(),
                         check=lambda events: codeguard.guard(paths, events[0].data))
    files = events[0].data.count(b"\n") - 1
    pcrs = {i: tpm.read_pcr(i).hex() for i in (VMM_CODE_PCR, VMM_CONFIG_PCR, VMM_POLICY_PCR)}
    return Measurement(str(tpm_dir), pcrs, config, policy, files)
