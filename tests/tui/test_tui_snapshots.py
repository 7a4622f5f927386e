"""Snapshots of the main screen at key phases, at 80x24 and 120x40, from the
committed transcript (no timing in them: a replay is the same every time).
Update after a deliberate change with ``pytest tests/tui --snapshot-update``
and look at the SVGs in tests/tui/__snapshots__/."""

from pathlib import Path

import pytest

from tui.app import MigrationApp
from tui.transcript import read

FIXTURE = Path(__file__).with_name("plain-demo.jsonl")
KEYS = {"handshake": ["n"], "precopy": ["n", "p"], "stopcopy": ["n", "p", "p"], "done": ["e"]}


def _app():
    _, frames = read(FIXTURE)
    return MigrationApp(frames=frames, replay_name="plain-demo.jsonl")


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("phase", ["precopy", "stopcopy", "done"])
def test_main_screen(snap_compare, phase, size):
    assert snap_compare(_app(), press=KEYS[phase], terminal_size=size)


def test_narrow_screen_shows_host_a_on_v(snap_compare):
    assert snap_compare(_app(), press=["n", "p", "v"], terminal_size=(80, 24))


def test_zoomed_map_and_a_selected_record(snap_compare):
    """A's map clicked near frame 0x140 (the processes' pages), then zoomed to one
    page per cell; the help panel shows record #5's fields."""
    async def run_before(pilot):
        await pilot.press("n", "p")
        await pilot.click("#src-map", offset=(14, 2))
        await pilot.press("z", "z", "k")
    assert snap_compare(_app(), run_before=run_before, terminal_size=(120, 40))
