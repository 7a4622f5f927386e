"""The TUI on real engines: two Machines in worker threads of the test
process, a real loopback socket, driven by Textual's Pilot."""

import asyncio
import threading

from tui.app import MigrationApp
from tui.live import Scenario

EXPECTED = ["handshake", "precopy", "stopcopy", "prepare", "commit", "resume", "done"]


async def _until(pilot, cond, limit=1200):
    """Let the app run until cond() (bounded by a step count, not a clock)."""
    for _ in range(limit):
        if cond():
            return True
        await pilot.pause(0.05)
    return False


def _engine_threads(before=frozenset()):
    """Engine threads alive now that were not before the test (other tests'
    servers may leave their daemon acceptor threads behind)."""
    return [t for t in threading.enumerate()
            if t.name.startswith(("tui-", "migrate-")) and t not in before]


def test_step_phase_by_phase_through_a_whole_plain_migration(tmp_path):
    before = frozenset(threading.enumerate())
    record = tmp_path / "run.jsonl"

    async def main():
        app = MigrationApp(scenario=Scenario(plain=True, run_on=10), record=str(record))
        async with app.run_test(size=(120, 40)) as pilot:
            held = lambda: app.session.stepper.waiting is not None      # noqa: E731
            assert await _until(pilot, lambda: app.session and held())
            seen = [app.frames[-1].phase]
            # Held at the first message: both engines are stopped, the shared
            # clock stands still, the source's guest runs no slice.
            m = app.session.tracker.machine
            v0 = m.vclock
            assert app.session.timebase.held and app.session.gate.held
            await pilot.pause(0.3)
            assert m.vclock == v0 and held()
            while seen[-1] != "done":
                await pilot.press("p")
                assert await _until(pilot, lambda: held() or app.frames[-1].phase == "done")
                await pilot.pause(0.1)
                if app.frames[-1].phase != seen[-1]:
                    seen.append(app.frames[-1].phase)
            assert seen == EXPECTED
            assert "Done" in str(app.query_one("#timeline").content)
            assert "RESUMED" in str(app.query_one("#log").render())
            await pilot.press("q")
        return app

    app = asyncio.run(main())
    assert app.session is None and not _engine_threads(before)
    assert record.read_text().rstrip().endswith('{"end":{"frames":%d}}' % len(app.frames))


def test_secure_message_steps_and_quit_while_held_leaves_nothing_running():
    before = frozenset(threading.enumerate())

    async def main():
        app = MigrationApp(scenario=Scenario(run_on=10))
        async with app.run_test(size=(80, 24)) as pilot:
            assert await _until(pilot, lambda: app.session and app.session.stepper.waiting is not None)
            types = []
            for _ in range(6):
                before = len(app.frames)
                await pilot.press("n")
                assert await _until(pilot, lambda: len(app.frames) > before
                                    and app.session.stepper.waiting is not None)
                types.append(app.frames[-1].message.rtype)
            # HELLO went out; the next records are the key exchange and the quotes, sealed after
            assert "KEY_SHARE" in types and app.frames[-1].phase == "attestation"
            listener = app.session._listener
            await pilot.press("q")          # held in the middle of the attestation
        assert listener.fileno() == -1
        return app

    asyncio.run(main())
    assert not _engine_threads(before)


def test_the_menu_restarts_the_scenario_with_a_defence_off():
    before = frozenset(threading.enumerate())

    async def main():
        app = MigrationApp(scenario=Scenario(plain=True, run_on=10))
        async with app.run_test(size=(120, 40)) as pilot:
            assert await _until(pilot, lambda: app.session and app.session.stepper.waiting is not None)
            first = app.session
            await pilot.press("x")
            await pilot.pause(0.2)
            await pilot.press("down", "down", "down", "enter")      # secure, plain, attestation, encryption
            assert await _until(pilot, lambda: app.session is not first and app.frames
                                and app.session.stepper.waiting is not None)
            assert app.scenario.insecure == ("encryption",) and not app.scenario.plain
            assert "INSECURE: encryption off" in app.frames[-1].mode
            assert "INSECURE" in str(app.query_one("#top").content)
            await pilot.press("q")
    asyncio.run(main())
    assert not _engine_threads(before)
