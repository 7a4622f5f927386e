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
            # Held, and the held step's frame has reached the UI (frames cross threads as messages).
            caught_up = lambda: len(app.frames) == app.session.tracker.index      # noqa: E731
            held = lambda: app.session.stepper.waiting is not None and caught_up()      # noqa: E731
            assert await _until(pilot, lambda: app.session and held())
            seen = [app.frames[-1].phase]
            # Held at the first message: both engines are stopped, the shared
            # clock stands still, the source's guest runs no slice.
            m = app.session.tracker.machine
            v0 = m.vclock
            assert app.session.timebase.held and app.session.gate.held
            await pilot.pause(0.3)
            assert m.vclock == v0 and held()
            # Zoom while held: the live map goes down to one page per cell.
            mp = app.query_one("#src-map")
            for _ in range(6):
                await pilot.press("z")
            head = str(mp.render()).split("\n")[:2]
            assert head[0] == "memory 16 MiB, 1 page/cell" and head[1].endswith(" of 0x1000"), head
            await pilot.press("Z", "Z", "Z", "Z")
            assert "(all)" in str(mp.render()).split("\n")[1]
            while seen[-1] != "done":
                await pilot.press("p")
                assert await _until(pilot, lambda: held() or (app.frames[-1].phase == "done" and caught_up()))
                await pilot.pause(0.1)
                if app.frames[-1].phase != seen[-1]:
                    seen.append(app.frames[-1].phase)
            assert seen == EXPECTED
            assert "Done" in str(app.query_one("#timeline").content)
            assert "RESUMED" in str(app.query_one("#log").render())
            # Each record's body, as the engine that sent or received it reported it.
            body = {(m.side, m.direction, m.rtype): dict(m.body) for m in app.msgs}
            assert body["source", "send", "HELLO"]["vm"] == "demo"
            assert body["destination", "recv", "HELLO"]["ram"] == "16 MiB"
            final = max(f.round for f in app.frames if f.phase == "stopcopy")
            assert body["destination", "recv", "ROUND_BEGIN"]["round"] == str(final)     # the last one
            assert "stop-and-copy" in body["source", "send", "ROUND_BEGIN"]["final round"]
            assert body["source", "recv", "RESUMED"]["vclock at resume"] \
                == body["destination", "send", "RESUMED"]["vclock at resume"]
            await pilot.press("k")
            assert "record #" in str(app.query_one("#help").content)
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
