"""Replaying a committed transcript (tests/tui/plain-demo.jsonl: a plain
16 MiB demo migration recorded with tui.live), and malformed transcripts."""

import asyncio
import json
from pathlib import Path

import pytest

from minivmm.cli import main as minivmm_main
from tui.app import MigrationApp
from tui.transcript import TranscriptError, Writer, read

FIXTURE = Path(__file__).with_name("plain-demo.jsonl")


def _app():
    _, frames = read(FIXTURE)
    return MigrationApp(frames=frames, replay_name="plain-demo.jsonl")


def text(app, wid):
    w = app.query_one(wid)
    return str(w.content) if hasattr(w, "content") else str(w.render())


def test_replay_forward_and_back_shows_each_step():
    async def main():
        app = _app()
        async with app.run_test(size=(120, 40)) as pilot:
            assert app.frames[app.cursor].phase == "boot" and "Boot" in text(app, "#help")
            await pilot.press("n")
            assert "HELLO" in text(app, "#log") and app.frames[app.cursor].phase == "handshake"
            await pilot.press("p")
            f = app.frames[app.cursor]
            assert (f.phase, f.round) == ("precopy", 0) and "Pre-copy round 0" in text(app, "#timeline")
            assert "obligation 3" in text(app, "#help")
            await pilot.press("o")                  # the next round: here the final one
            assert app.frames[app.cursor].round == 1 and app.frames[app.cursor].phase == "stopcopy"
            assert "obligation 5" in text(app, "#help")
            await pilot.press("e")
            assert app.frames[app.cursor].phase == "done" and "RESUMED" in text(app, "#log")
            assert "counter" in text(app, "#dst-detail")
            for _ in range(4):
                await pilot.press("left")
            assert app.cursor == len(app.frames) - 5
            await pilot.press("p")
            assert app.frames[app.cursor].phase == "done"
            await pilot.press("r")                  # restart: back to the first frame
            assert app.cursor == 0 and "HELLO" not in text(app, "#log")
            await pilot.press("q")
    asyncio.run(main())


def test_writer_round_trip(tmp_path):
    _, frames = read(FIXTURE)
    w = Writer(tmp_path / "t.jsonl", {"guest": "demo"})
    for f in frames:
        w.write(f)
    w.close()
    scenario, again = read(tmp_path / "t.jsonl")
    assert scenario == {"guest": "demo"} and again == frames


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:len(lines) // 2], "truncated: no end record"),
    (lambda lines: lines[:-1] + [lines[-1][:5]], "truncated"),
    (lambda lines: [lines[0].replace('"version":2', '"version":9')] + lines[1:], "version 9"),
    (lambda lines: ["{not json\n"] + lines[1:], "not a minivmm TUI transcript|not JSON"),
    (lambda lines: lines[:3] + ['{"frame": {"index": 2}}\n'] + lines[3:], "Frame fields"),
    (lambda lines: lines[:2] + [lines[2].replace('"phase":"boot"', '"phase":"hack"')] + lines[3:],
     "unknown phase|index"),
    (lambda lines: [], "empty"),
])
def test_a_malformed_transcript_gets_a_clear_error(tmp_path, damage, message):
    lines = FIXTURE.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(damage(lines)))
    with pytest.raises(TranscriptError, match=message):
        read(bad)


def test_the_cli_refuses_a_malformed_transcript_with_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text()[:1000])
    assert minivmm_main(["tui", "--replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot replay" in err and "truncated" in err


def test_an_overlong_line_is_refused_before_it_is_parsed(tmp_path):
    bad = tmp_path / "long.jsonl"
    bad.write_text(json.dumps({"format": "minivmm-tui-transcript", "version": 1, "scenario": {}}) + "\n"
                   + "[" + " " * (1 << 20) + "]\n")
    with pytest.raises(TranscriptError, match="longer than"):
        read(bad)


def test_a_map_too_varied_for_a_line_is_written_merged(tmp_path):
    """131072 frames alternating free / user: 393,216 characters of runs; the
    writer merges cells (two a cell) until the line fits, and says so in per_cell."""
    from dataclasses import replace

    from tui.model import MemoryMap
    _, frames = read(FIXTURE)
    varied = MemoryMap(131072, 1, "f-u-" * 65536)
    f = replace(frames[0], source=replace(frames[0].source, memory=varied))
    w = Writer(tmp_path / "t.jsonl", {})
    w.write(f)
    w.close()
    _, again = read(tmp_path / "t.jsonl")
    mem = again[0].source.memory
    assert (mem.npages, mem.per_cell, mem.cells) == (131072, 2, "u-" * 65536)
