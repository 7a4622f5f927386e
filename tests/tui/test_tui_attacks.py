"""Attacks in the TUI: the menu lists the lab's network attacks; choosing one
replays the scenario with the lab's man in the middle between the two real
engines, and the screen shows where it was caught or the damage."""

import asyncio
import threading

from migrate.lab.scenario import SECRET
from tui import attacks
from tui.app import MigrationApp
from tui.live import Scenario

from test_tui_live import _engine_threads, _until


def test_the_menu_lists_every_network_attack_of_the_lab():
    keys = [k for k, _ in attacks.menu()]
    for name in ("eavesdrop", "tamper", "replay-record", "forge-abort", "downgrade"):
        assert f"attack:{name}" in keys
    base = Scenario(plain=True)
    assert attacks.scenario_for("attack:tamper", base).attack == "tamper"
    assert attacks.scenario_for("secure", attacks.scenario_for("attack:tamper", base)).attack is None


def _run_to_end(scenario):
    before = frozenset(threading.enumerate())

    async def main():
        app = MigrationApp(scenario=scenario)
        async with app.run_test(size=(120, 40)) as pilot:
            assert await _until(pilot, lambda: app.session and app.session.stepper.waiting is not None)
            await pilot.press("e")                                  # run to the end
            assert await _until(pilot, lambda: app.session is not None and not app.session.alive, limit=4000)
            await pilot.pause(0.2)
            notes = [f.note for f in app.frames]
            top = str(app.query_one("#top").content)
            await pilot.press("q")
        return notes, top, app.msgs
    notes, top, msgs = asyncio.run(main())
    assert not _engine_threads(before)
    return notes, top, msgs


def test_an_eavesdropper_in_plain_mode_shows_the_leaked_secret():
    notes, top, _ = _run_to_end(Scenario(guest="migrate-lab", plain=True, attack="eavesdrop", run_on=10))
    assert "ATTACK: eavesdrop" in top
    assert any(n.startswith("ATTACK eavesdrop:") and SECRET in n for n in notes), notes[-8:]


def test_a_tampered_record_is_shown_rejected_in_secure_mode():
    notes, _, msgs = _run_to_end(Scenario(guest="migrate-lab", attack="tamper", run_on=10))
    rejected = [n for n in notes if "aborted" in n and "failed authentication" in n]
    assert rejected, notes[-8:]
    # The rejection's fields: the reject line, and the ABORT record B sent, carry the reason.
    # Before that, each side's QUOTE from the other: what verifying it established.
    for side in ("source", "destination"):
        quote = [dict(m.body) for m in msgs if (m.side, m.direction, m.rtype) == (side, "recv", "QUOTE")]
        assert quote and quote[0]["verdict"].startswith("verified") and quote[0]["host"], quote
        assert quote[0]["PCRs matching the policy"]
    for direction in ("reject", "send"):
        reasons = [dict(m.body).get("reason", "") for m in msgs if (m.rtype, m.direction) == ("ABORT", direction)]
        assert any("failed authentication" in r for r in reasons), [(m.rtype, m.direction, m.body) for m in msgs[-4:]]
    assert any("the guest ran on at A" in n for n in notes)    # exactly one copy: A's


def test_a_dropped_page_in_plain_mode_rolls_the_counter_back_on_b():
    # The TUI replays the lab's scenario with the lab's lockstep pre-copy
    # (--round-ticks): the counter's page always changed after round 0, so the
    # stale copy B keeps shows every time, on any machine.
    from migrate.lab.scenario import counts

    async def main():
        app = MigrationApp(scenario=Scenario(guest="migrate-lab", plain=True, attack="drop", run_on=10))
        async with app.run_test(size=(120, 40)) as pilot:
            assert await _until(pilot, lambda: app.session and app.session.stepper.waiting is not None)
            await pilot.press("e")
            assert await _until(pilot, lambda: app.session is not None and not app.session.alive, limit=4000)
            await pilot.pause(0.2)
            frames = list(app.frames)
            await pilot.press("q")
        return frames
    frames = asyncio.run(main())
    assert any(f.note.startswith("ATTACK drop:") and "dropped the counter's newer page" in f.note for f in frames)
    a = max((counts("\n".join(f.source.console) + "\n") for f in frames), key=len)
    b = next(counts("\n".join(f.destination.console) + "\n") for f in reversed(frames)
             if counts("\n".join(f.destination.console) + "\n"))
    assert a and b and b[0] <= a[-1], (a, b)          # B counts again what A already printed
