"""Read-only views of process protection, for tests, the TUI and students:
frozen copies of the metadata (never the keys)."""

from __future__ import annotations

from dataclasses import dataclass

from minivmm.cpu import CpuState


@dataclass(frozen=True)
class PageView:
    owner: int
    vaddr: int
    vpn: int
    frame: int
    state: str
    version: int
    nonce: str
    mac: str


@dataclass(frozen=True)
class ProcessView:
    pid: int
    name: str
    ident: int
    measurement: str
    key_handle: int
    shared_vaddr: int
    in_kernel: bool
    saved_context: CpuState | None
    stopped: str | None
    exited: bool
    pages: tuple[PageView, ...]

    def page(self, vaddr: int) -> PageView:
        for p in self.pages:
            if p.vpn == vaddr >> 12:
                return p
        raise KeyError(f"{vaddr:#x} is not a protected page of pid {self.pid}")


def views(procs) -> tuple[ProcessView, ...]:
    """Frozen views of ``procs`` (``ProtectedProcess`` objects), by pid."""
    return tuple(
        ProcessView(pid=p.pid, name=p.name, ident=p.ident, measurement=p.measurement.hex(),
                    key_handle=p.key_handle, shared_vaddr=p.shared_vaddr, in_kernel=p.in_kernel,
                    saved_context=p.saved if p.in_kernel else None, stopped=p.stopped,
                    exited=p.exited,
                    pages=tuple(PageView(owner=p.pid, vaddr=m.vpn << 12, vpn=m.vpn, frame=m.ppn,
                                         state=m.state, version=m.version, nonce=m.nonce.hex(),
                                         mac=m.tag.hex())
                                for m in sorted(p.pages.values(), key=lambda m: m.vpn)))
        for p in sorted(procs, key=lambda p: p.pid))
