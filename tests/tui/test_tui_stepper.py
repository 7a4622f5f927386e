"""The Stepper on its own: what the UI can see while a step is published."""

import threading

from migrate.steps import Timebase
from tui.stepper import MESSAGE, Position, SliceGate, Stepper


def test_a_held_steps_frame_goes_out_with_the_stepper_already_held_and_a_key_then_releases_it():
    """The app renders a frame as soon as it arrives and nothing arrives after
    a held step's frame: if ``waiting`` were set only after publishing, the
    screen could say "running" for as long as both VMMs wait (seen in a demo
    under load).  And a key pressed as soon as the frame shows releases that
    very step (it is not taken for an earlier one)."""
    stepper = Stepper(Timebase(), SliceGate(), paused=True)
    seen, shown, released = [], threading.Event(), threading.Event()

    def frame(pos, stop):
        seen.append((pos.n, stop, stepper.waiting))
        shown.set()

    def engine():
        stepper.at_step(lambda: Position(1, "handshake", None), frame)
        released.set()

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    assert shown.wait(30)
    assert seen == [(1, True, Position(1, "handshake", None))]
    stepper.command(MESSAGE)            # the key, pressed the moment the frame showed
    assert released.wait(30), "the key did not release the step it was pressed on"
    t.join(30)
    assert stepper.waiting is None
