
from guests.build import Program, build_image
from minivmm.machine import Machine


def prog(name, source, **kw):
    """An inline user program (the test author's way of writing a guest)."""
    return Program(name, source, filename=f"<{name}>", **kw)


def boot(*programs, **kw):
    return Machine(build_image(list(programs)), **kw)




# A process that only yields: alive, scheduled, touching nothing.
IDLE = """
_start:
    mov eax, SYS_YIELD
    int 0x80
    jmp _start
"""


def started(*programs, max_ticks=200):
    """Boot ``programs`` and run until every one has started: (machine,
    {pid: its page directory's address}) -- what a test needs to call
    HC_PROTECT itself or to walk a process's page tables, as a kernel would."""
    from minivmm import events as ev
    m = boot(*programs)
    cr3 = {}
    m.events.subscribe(lambda e: cr3.setdefault(e.pid, e.cr3 & 0xFFFFF000), ev.ProcessStart)
    m.run(until=lambda m: len(cr3) == len(programs), max_ticks=max_ticks)
    return m, cr3
