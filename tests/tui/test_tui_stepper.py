"""The Stepper on its own: a key pressed while a held step is being shown."""

import threading

from migrate.steps import Timebase
from tui.stepper import MESSAGE, Position, SliceGate, Stepper


def test_a_key_pressed_as_soon_as_a_held_steps_frame_shows_releases_that_step():
    """The student presses "next" the moment the frame appears, before the
    engine thread has started waiting: that press is for this step, so the
    engine goes on.  (Taking the generation to wait on only after publishing
    the frame lost the press: the engine waited for a second one.)"""
    stepper = Stepper(Timebase(), SliceGate(), paused=True)
    released = threading.Event()

    def frame(pos, stop):
        assert stop
        stepper.command(MESSAGE)        # the key, pressed as the frame shows

    def engine():
        stepper.at_step(lambda: Position(1, "handshake", None), frame)
        released.set()

    threading.Thread(target=engine, daemon=True).start()
    assert released.wait(30), "the key pressed on the held step did not release it"
    assert stepper.waiting is None
