"""Round trips of the state helpers migration relies on (minivmm/state.py, machine.py)."""

import json

import pytest

from guests.catalog import get_guest
from minivmm.errors import StateError
from minivmm.machine import Machine
from minivmm.memory import GuestRAM
from minivmm.state import MachineState


@pytest.fixture(scope="module")
def image():
    return get_guest("demo").build(16 << 20)


def test_doc_round_trip_without_ram(image):
    m = Machine(image)
    m.run(max_ticks=15)
    st = m.save_state()
    doc = json.loads(json.dumps(st.to_doc(), sort_keys=True))       # what the wire carries
    back = MachineState.from_doc(doc, st.ram_size, st.ram)
    assert back == st
    assert m.save_state(ram=False).ram == b""
    assert MachineState.from_doc(doc, st.ram_size).to_doc() == st.to_doc()


def test_restore_adopting_ram_continues_exactly(image):
    ref = Machine(image)
    ref.run(max_ticks=60)
    m = Machine(image)
    m.run(max_ticks=20)
    st = m.save_state(ram=False)
    ram = GuestRAM(m.ram.size)
    ram.view[:] = m.ram.view
    again = Machine.restore(st, ram=ram)
    assert again.ram is ram
    again.run(max_ticks=40)
    assert again.console.text() == ref.console.text()
    assert (again.vclock, again.exits) == (ref.vclock, ref.exits)


def test_restore_refuses_missing_or_mismatched_ram(image):
    m = Machine(image)
    st = m.save_state(ram=False)
    with pytest.raises(StateError, match="holds 0 bytes"):
        Machine.restore(st)
    with pytest.raises(StateError, match="RAM of"):
        Machine.restore(st, ram=GuestRAM(32 << 20))


@pytest.mark.parametrize("doc", [[], {"cpu": 1}, {"console": {}}, "x"])
def test_from_doc_rejects_malformed(doc):
    with pytest.raises(StateError, match="malformed"):
        MachineState.from_doc(doc, 16 << 20)
