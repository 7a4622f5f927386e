"""minivmm never imports the TUI or Textual: the VMM and its CLI parser work
without them (the tui command comes through the entry-point group)."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import minivmm
for m in pkgutil.iter_modules(minivmm.__path__):
    if m.name != "__main__":            # that one runs the CLI
        try:
            importlib.import_module("minivmm." + m.name)
        except ModuleNotFoundError as exc:  # an optional extra's module (benchplots: matplotlib)
            if exc.name != "matplotlib":
                raise
from minivmm.cli import build_parser
p = build_parser()
assert "tui" in p._subparsers._group_actions[0].choices, "the tui command is registered"
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("textual", "tui.app", "tui.widgets")
             or n in ("tui.app", "tui.widgets", "tui.live", "tui.capture"))
print(bad)
assert not bad, bad
"""


def test_minivmm_and_its_parser_import_neither_textual_nor_the_tui_app():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
