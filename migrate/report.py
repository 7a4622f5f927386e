"""The migration report: what a migration did, for people and for tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RoundStats:
    round: int
    pages: int              # pages in this round's set
    data_pages: int = 0     # sent with data
    zero_pages: int = 0     # sent as ZERO_PAGES
    bytes: int = 0          # bytes on the wire for this round
    seconds: float = 0.0
    send_seconds: float = 0.0   # time in copy + hash + send (cost per page)
    dirtied: int = 0        # pages dirtied while the round was sent
    final: bool = False     # the stop-and-copy round (guest paused)

    @property
    def dirty_rate(self) -> float:
        return self.dirtied / self.seconds if self.seconds > 0 else 0.0

    @property
    def cost_per_page(self) -> float | None:
        return self.send_seconds / self.data_pages if self.data_pages else None


@dataclass
class MigrationReport:
    role: str
    peer: str
    ram_size: int
    policy: dict = field(default_factory=dict)
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str = ""
    target_met: bool | None = None      # pre-copy's verdict: the final set fits the downtime target
    estimated_pages_seconds: float | None = None    # its estimate for sending the final set
    outcome: str = "running"            # completed | aborted | commit-unconfirmed
    error: str = ""
    total_seconds: float = 0.0
    downtime_seconds: float | None = None
    downtime_method: str = ""
    vclock_pause: int | None = None
    vclock_resume: int | None = None
    state_bytes: int = 0
    bytes_sent: int = 0                 # all records this side sent
    bytes_received: int = 0             # all records this side received
    mode: str = "plain mode"            # which protocol ran (migrate/secure/mode.py describe())
    phases: dict = field(default_factory=dict)  # secure phases: attestation, key_release, commit (s)

    @property
    def precopy_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.final)

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, rd in zip(self.rounds, d["rounds"]):
            rd["dirty_rate"] = r.dirty_rate
        return d

    def format(self) -> str:
        mib = self.ram_size >> 20
        lines = [f"migration report ({self.role}, {mib} MiB guest, peer {self.peer}): {self.outcome}"
                 + (f" -- {self.error}" if self.error else "")]
        lines.append(f"  mode: {self.mode}")
        if self.phases:
            lines.append("  secure phases: " + ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.1f} ms"
                                                         for k, v in self.phases.items()))
        if self.rounds:
            lines.append("  round   pages    data    zero      bytes     ms  dirtied  dirty rate (pages/s)")
        for r in self.rounds:
            tag = "final" if r.final else f"{r.round:5d}"
            dirt = (f"{r.dirtied:8d}  {r.dirty_rate:12.0f}" if self.role == "source"
                    else f"{'-':>8}  {'-':>12}")      # only the source sees the guest write
            lines.append(f"  {tag:>5} {r.pages:7d} {r.data_pages:7d} {r.zero_pages:7d} {r.bytes:10d} "
                         f"{r.seconds * 1e3:6.1f} {dirt}")
        if self.stop_reason:
            lines.append(f"  pre-copy stopped after {self.precopy_rounds} rounds: {self.stop_reason}")
        target = self.policy.get("downtime_target")
        if self.target_met is False and target and self.estimated_pages_seconds is not None:
            over = self.estimated_pages_seconds - target
            lines.append(f"  downtime target NOT met: the final set was estimated at "
                         f"{self.estimated_pages_seconds * 1e3:.1f} ms, {over * 1e3:.1f} ms over the "
                         f"{target * 1e3:g} ms target")
        wire = max(self.bytes_sent, self.bytes_received)
        verb = "sent" if self.bytes_sent >= self.bytes_received else "received"
        if self.rounds or wire:
            lines.append(f"  total time {self.total_seconds * 1e3:.1f} ms; {wire} bytes {verb} "
                         f"({wire / max(self.ram_size, 1):.2f} x RAM), state document {self.state_bytes} bytes")
        else:
            lines.append(f"  total time {self.total_seconds * 1e3:.1f} ms; nothing was transferred")
        if self.total_seconds > 0 and wire > 0:
            lines.append(f"  throughput {wire / self.total_seconds / 1e6:.1f} MB/s on the wire, "
                         f"{self.ram_size / self.total_seconds / 1e6:.1f} MB/s of guest RAM")
        if self.downtime_seconds is not None:
            over = ""
            if target and self.downtime_seconds > target:
                over = f"; {(self.downtime_seconds - target) * 1e3:.2f} ms over the {target * 1e3:g} ms target"
            lines.append(f"  downtime {self.downtime_seconds * 1e3:.2f} ms (source pause to destination "
                         f"resume; {self.downtime_method}{over})")
        if self.vclock_pause is not None:
            lines.append(f"  guest instruction count (vclock) at pause {self.vclock_pause}"
                         + (f", at resume {self.vclock_resume}" if self.vclock_resume is not None else ""))
        return "\n".join(lines)


