
from guests.build import Program, build_image
from minivmm.machine import Machine


def prog(name, source, **kw):
    """An inline user program (the test author's way of writing a guest)."""
    return Program(name, source, filename=f"<{name}>", **kw)


def boot(*programs, **kw):
    return Machine(build_image(list(programs)), **kw)


