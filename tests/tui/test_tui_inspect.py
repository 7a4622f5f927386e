"""Looking closer: zooming the memory map down to one page per cell, and a
selected record's fields, on the committed transcript (tests/tui/plain-demo.jsonl,
re-recorded by tests/tui/make_fixture.py) driven by Textual's Pilot."""

import asyncio
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from tui.app import MigrationApp
from tui.transcript import read
from tui.widgets import GLYPHS, MemoryMapView

from test_tui_replay import FIXTURE, _app, text

HEADER = re.compile(r"memory 16 MiB, (\d+) pages?/cell\nframes 0x([0-9a-f]+)-0x([0-9a-f]+) (\(all\)|of 0x1000)")



def shown(app, wid="#src-map"):
    """(pages per cell, first frame, last frame, whole?, the cell rows' text) of a map as rendered."""
    text = str(app.query_one(wid, MemoryMapView).render())
    m = HEADER.match(text)
    assert m, text[:120]
    rows = text.split("\n")[2:2 + 6]
    return int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), m.group(4) == "(all)", "".join(rows)


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_zoom_into_the_memory_map_down_to_one_page_per_cell(size):
    async def main():
        app = _app()
        async with app.run_test(size=size) as pilot:
            await pilot.press("n", "p")             # pre-copy round 0: A's map has sent and dirty pages
            if size[0] < 110:
                await pilot.press("v")              # one column at a time: show host A
            per, lo, hi, whole, _ = shown(app)
            assert whole and (lo, hi) == (0, 0xfff) and per > 1
            pers = [per]
            while pers[-1] > 1:
                await pilot.press("z")
                per, lo, hi, whole, cells = shown(app)
                assert per < pers[-1] and not whole and hi - lo + 1 <= 4096
                pers.append(per)
                assert len(pers) < 8
            # One page per cell: each cell is exactly its frame's transfer state.
            mem = app.frames[app.cursor].source.memory
            assert mem.per_cell == 1
            assert cells == "".join(GLYPHS[mem.cell(f)[1]] for f in range(lo, hi + 1))
            assert hi - lo + 1 == len(cells)
            await pilot.press("right_square_bracket")       # move the window on
            per2, lo2, hi2, _, _ = shown(app)
            assert per2 == 1 and lo2 > lo and hi2 - lo2 == hi - lo
            await pilot.press("left_square_bracket")
            assert shown(app)[1:3] == (lo, hi)
            for _ in pers[1:]:
                await pilot.press("Z")
            assert shown(app)[3]                            # zoomed out: all frames again
            # A click on a cell zooms into that cell's frames.
            per, _, _, _, _ = shown(app)
            await pilot.click("#src-map", offset=(5, 2 + 3))       # row 3, column 5
            width = app.query_one("#src-map").size.width
            frame = (3 * width + 5) * per
            per2, lo2, hi2, whole, _ = shown(app)
            assert per2 < per and not whole and lo2 <= frame <= hi2
            await pilot.press("q")
    asyncio.run(main())


def test_a_selected_record_shows_its_fields():
    async def main():
        app = _app()
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("n", "p")                 # at A -> ROUND_BEGIN (#5)
            await pilot.press("k")                      # select the latest record
            help_ = text(app, "#help")
            assert app.selected == 5 and "record #5: ROUND_BEGIN" in help_
            assert "A -> B, sent by A; seq 1, 8 bytes" in help_ and "body: round 0; pages 4096" in help_
            await pilot.press("k", "k")                 # up: B's WELCOME, then what B decoded of HELLO
            help_ = text(app, "#help")
            assert "record #3: WELCOME" in help_ and "status OK" in help_
            await pilot.press("k")
            help_ = text(app, "#help")
            assert "record #2: HELLO" in help_ and "A -> B, received by B" in help_ and "vm demo" in help_
            await pilot.press("j")
            assert app.selected == 3
            # A received record's body is what the receiver decoded, reported after its step.
            await pilot.press("n")                      # B <- ROUND_BEGIN (#6)
            app.select_message(6)
            await pilot.pause()
            assert "not decoded yet" in text(app, "#help")
            await pilot.press("n")                      # one step on: B has reported it
            assert "body: round 0; pages 4096" in text(app, "#help")
            # The mouse: a click on a line of the log selects that record.
            await pilot.click("#log", offset=(6, 1))    # the first message line: #1
            assert app.selected == 1 and "record #1: HELLO" in text(app, "#help")
            await pilot.press("escape")                 # back to the phase's help
            assert app.selected is None and "Pre-copy round 0" in text(app, "#help")
            await pilot.press("k")
            assert app.selected == 7                   # the latest: A -> PAGES
            await pilot.press("left", "left", "left")   # stepping back past it clears the selection
            assert app.selected is None
            await pilot.press("e", "k")                 # the end: A received RESUMED, with B's clock
            assert "RESUMED" in text(app, "#help") and "vclock at resume" in text(app, "#help")
            await pilot.press("q")
    asyncio.run(main())


def test_a_version_1_transcript_still_replays(tmp_path):
    """Before zoom and record bodies: maps at several pages a cell, no body, no updated."""
    _, frames = read(FIXTURE)
    lines = [json.dumps({"format": "minivmm-tui-transcript", "version": 1, "scenario": {}})]
    for f in frames[:6]:
        d = asdict(f)
        del d["updated"]
        if d["message"] is not None:
            del d["message"]["body"]
        for side in ("source", "destination"):
            mem = getattr(f, side).memory
            if mem is not None:
                d[side]["memory"] = asdict(mem.regroup(1024))
        lines.append(json.dumps({"frame": d}))
    lines.append(json.dumps({"end": {"frames": 6}}))
    old = tmp_path / "v1.jsonl"
    old.write_text("\n".join(lines) + "\n")
    _, again = read(old)
    assert len(again) == 6 and again[5].source.memory.per_cell == 4
    assert [f.message for f in again] == [f.message and replace(f.message, body=()) for f in frames[:6]]

    async def main():
        app = MigrationApp(frames=again, replay_name="v1.jsonl")
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("e", "z", "z", "z")
            assert shown(app)[0] == 4                   # no finer than the file holds
            await pilot.press("q")
    asyncio.run(main())


def test_every_key_of_the_app_is_in_the_documented_key_table():
    doc = Path(__file__).parents[2] / "docs" / "tui.md"
    keys_section = doc.read_text().split("## Keys", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([^`]+)`", keys_section))
    names = {"left": "←", "right": "→", "left_square_bracket": "[", "right_square_bracket": "]",
             "escape": "esc", "ctrl+c": "Ctrl+C"}
    for b in MigrationApp.BINDINGS:
        key = names.get(b.key, b.key)
        assert key in documented, f"key {key!r} ({b.description}) is not in docs/tui.md's key table"
