"""``minivmm lab ATTACK``: one whole attack scenario, told in a few lines.

Every scenario starts real VMM processes on loopback (``minivmm.vmmproc``):
a destination B (``serve``), usually a man in the middle (``minivmm mitm``),
and a source A (``run migrate-lab --migrate-to ...``) whose guest runs the
protected secret keeper beside an unprotected counter (1..60).  Then it reads
what the processes printed and says:

* which defence fired and its message (A's or B's "failed: ..." line), and
  where the guest ran on: exactly one copy, counter without gap or repeat;
* or, with the defence off, the damage: the leaked secret (from the man in
  the middle's analysis), the counter that counts again from an earlier value
  (rolled back), a tampered console, two copies that both count.

All its processes are gone when it returns, on success, error or Ctrl-C
(``vmmproc.kill_all``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from migrate.lab.attacks import ATTACKS
from minivmm import vmmproc
from minivmm.vmmproc import Vmm

GUEST = "migrate-lab"
COUNT = 40                          # the counter's last line in the migrate-lab guest
SECRET = "swordfish: launch code 4-8-15-16"     # what the keeper keeps (guests/programs/keeper.s)
AFTER = "20"                        # ticks before the migration starts
MAX_ROUNDS = "4"                    # pre-copy rounds at most: the guest must not finish during
                                    # pre-copy on a loaded machine (the scenario needs it to move)
ROUND_TICKS = "8"                   # lockstep pre-copy: the guest waits while a round is sent and
                                    # runs 8 ticks (2 counter lines) between rounds, so the
                                    # counter's page always changed since its last copy, however
                                    # fast or slow this machine is: a stale copy of it always shows
                                    # (replay-record, replay-round, drop); and it never finishes
                                    # (nor the keeper) during pre-copy (20 + 4 x 8 < 150 ticks)
TIMEOUT = 5.0                       # B's --timeout (seconds per record); A waits twice as long,
                                    # so B's deadline decides first (the delay scenario)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str               # network | replay-stream | impersonate | toctou | double-resume | resume-early | rollback | rogue-vmm
    summary: str
    defence: str


def _network():
    return {n: Scenario(n, "network", a.summary, a.defence) for n, a in ATTACKS.items() if n != "none"}


SCENARIOS: dict[str, Scenario] = {
    **_network(),
    "replay-stream": Scenario("replay-stream", "replay-stream",
                              "play a captured earlier migration of the VM back to its destination",
                              "replay (fresh handshake per session; VM generation in the TPM NV counter)"),
    "impersonate": Scenario("impersonate", "impersonate",
                            "the man in the middle answers as the destination, with an uncertified TPM",
                            "attestation (AK certificate from the trusted issuer)"),
    "toctou": Scenario("toctou", "toctou",
                       "host attack: B's PCR 9 is extended after attestation, before key release (serve --lab-toctou)",
                       "toctou (fresh quote before key release; release key sealed to the PCRs)"),
    "double-resume": Scenario("double-resume", "double-resume",
                              "host attack: A resumes its copy after a confirmed migration (run --lab-double-resume)",
                              "ordering (process keys destroyed before COMMIT)"),
    "resume-early": Scenario("resume-early", "resume-early",
                             "host attack: B resumes the guest as soon as it has all of it, without "
                             "waiting for COMMIT (serve --lab-resume-early)",
                             "attestation (the hook is B's configuration, measured into PCR 9; only a "
                             "VMM that waits for COMMIT is approved)"),
    "rollback": Scenario("rollback", "rollback",
                         "host attack: A's admin restores an old saved state of a VM that has since "
                         "migrated away, and migrates it again",
                         "replay (the VM's identity and generation travel with its state; A's "
                         "migrated-away mark and TPM counter, B's NV counter)"),
    "rogue-vmm": Scenario("rogue-vmm", "rogue-vmm",
                          "host attack: B runs with a defence switched off (serve --insecure toctou)",
                          "attestation (the policy approves only the secure configuration)"),
}


def list_lines() -> list[str]:
    w = max(len(n) for n in SCENARIOS)
    return [f"{n:<{w}}  {s.summary}" for n, s in SCENARIOS.items()]


# ------------------------------------------------------------------ reading
_COUNT = re.compile(r"^(counter|HACKED!) (\d+)$", re.M)


def counts(console: str) -> list[int]:
    return [int(m.group(2)) for m in _COUNT.finditer(console)]


def _line(v: Vmm | None, *needles: str) -> str | None:
    if v is None:
        return None
    for line in v.err_lines:
        if any(n in line for n in needles):
            return line.strip()
    return None


def _failure(v: Vmm | None) -> str | None:
    """The VMM's own line saying a migration failed (or was refused), if any."""
    if v is None:
        return None
    line = next((ln.strip() for ln in v.err_lines if ln.startswith("minivmm ") and " failed: " in ln
                 and ("incoming migration from" in ln or "migration to" in ln)), None)
    line = line or _line(v, "commit-unconfirmed", "-- aborted", "REFUSED", "an older copy")
    if line is None:
        return None
    for cut in ("; the guest continues here", "; everything received was discarded, nothing resumed"):
        line = line.split(cut)[0]
    return line


class Lab:
    def __init__(self, name: str, *, insecure=(), plain: bool = False, workdir: Path | None = None,
                 out=print):
        if name not in SCENARIOS:
            raise ValueError(f"unknown lab scenario {name!r}; 'minivmm lab --list' lists them")
        if plain and insecure:
            raise ValueError("--plain and --insecure: the plain engine has no defence to turn off")
        self.s = SCENARIOS[name]
        self.insecure = tuple(sorted(set(insecure)))
        self.plain = plain
        self.out = out
        self.work = Path(workdir).resolve() if workdir else None
        self.vmms: dict[str, Vmm] = {}
        self.trust: Path | None = None
        self.no_verdict: str | None = None      # B stopped before it said how the migration ended

    def say(self, text: str) -> None:
        self.out(f"lab {self.s.name}: {text}")

    # ---------------------------------------------------------------- setup
    def _mode(self) -> str:
        if self.plain:
            return "PLAIN engine (no defence at all)"
        if self.insecure:
            return f"secure protocol WITH {', '.join(self.insecure).upper()} OFF"
        return "secure protocol, every defence on"

    def _trust(self) -> None:
        if self.plain:
            return
        from migrate.secure.setup import setup
        configs = [{}] + ([{"insecure": self.insecure}] if self.insecure else [])
        self.trust = self.work / "trust"
        setup(self.trust, configs)

    def _start(self, key: str, *args, name: str | None = None, trust=True) -> Vmm:
        v = Vmm(*args, cwd=self.work, name=name or key, trust=self.trust if trust else None)
        self.vmms[key] = v
        return v

    def _insecure_args(self, extra=()) -> list[str]:
        return [a for d in sorted(set(self.insecure) | set(extra)) for a in ("--insecure", d)]

    def _serve(self, *extra, key="B", name="B") -> tuple[Vmm, int]:
        v = self._start(key, "serve", "--listen", "127.0.0.1:0", "--timeout", str(TIMEOUT), *extra, name=name)
        return v, v.port()

    def _mitm(self, *args) -> int:
        v = self._start("mitm", "mitm", "--listen", "127.0.0.1:0", *args)
        return v.port()

    def _source(self, port: int, *extra) -> Vmm:
        return self._start("A", "run", GUEST, "--migrate-to", f"127.0.0.1:{port}", "--after", AFTER,
                           "--timeout", str(2 * TIMEOUT), "--max-rounds", MAX_ROUNDS, "--round-ticks", ROUND_TICKS,
                           *self._insecure_args(), *extra)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        keep = set(vmmproc.running())
        tmp = None
        if self.work is None:
            tmp = tempfile.mkdtemp(prefix="minivmm-lab-")
            self.work = Path(tmp)
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.say(f"{self.s.summary}")
            self.say(f"mode: {self._mode()}; the defence meant to stop it: {self.s.defence}")
            self._trust()
            getattr(self, "_run_" + self.s.kind.replace("-", "_"))()
            return self.judge()
        finally:
            killed = vmmproc.kill_all(keep=keep)
            if tmp is None:         # a kept work directory: the processes' output beside the trust files
                for key, v in self.vmms.items():
                    (self.work / f"{key}.stdout").write_text(v.stdout)
                    (self.work / f"{key}.stderr").write_text(v.stderr)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            self.say(f"all processes of this scenario stopped ({killed} still running were killed)")

    def _finish_destination(self, b: Vmm) -> None:
        """B runs the guest to its end if it resumed it; otherwise it would
        wait for another migration: give it time to report, then stop it.
        B that took a connection always reports (resumed, or failed: its own
        deadlines end every session); on a loaded machine that may take a while,
        so it gets a minute before it is stopped, and then that is said."""
        t0 = time.monotonic()
        while b.proc.poll() is None:
            if _line(b, " failed: "):
                break
            if _line(b, "resumed guest"):
                b.finish(timeout=120)
                return
            waited = time.monotonic() - t0
            if waited > 60 or (waited > 3 * TIMEOUT and not _line(b, "incoming migration from")):
                if _line(b, "incoming migration from"):
                    self.no_verdict = f"B took the migration but said nothing of it within {waited:.0f} s"
                break
            time.sleep(0.05)
        if b.proc.poll() is None:
            b.kill()

    def _run_network(self) -> None:
        b, bport = self._serve(*self._insecure_args())
        extra = ["--delay", str(TIMEOUT + 3)] if self.s.name == "delay" else []
        mport = self._mitm("--forward", f"127.0.0.1:{bport}", "--attack", self.s.name, "--quiet", *extra)
        a = self._source(mport)
        a.finish(timeout=300)
        self._finish_destination(b)
        self.vmms["mitm"].finish(timeout=3 * TIMEOUT + 10)

    def _run_replay_stream(self) -> None:
        capture = self.work / "earlier.mvcap"
        b, bport = self._serve(*self._insecure_args())
        mport = self._mitm("--forward", f"127.0.0.1:{bport}", "--capture", str(capture), "--quiet")
        a = self._source(mport)
        a.finish(timeout=300)
        self._finish_destination(b)
        self.vmms["mitm"].finish(timeout=30)
        self.say(f"first migration A -> B captured ({capture.stat().st_size} bytes); B ran the guest to "
                 f"its end; now B restarts and the attacker replays the capture to it")
        self.vmms["B1"], self.vmms["mitm1"] = b, self.vmms.pop("mitm")
        b2, b2port = self._serve(*self._insecure_args(), key="B2", name="B")     # same TPM as B
        self._start("mitm", "mitm", "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{b2port}",
                    "--attack", "replay-stream", "--replay", str(capture), "--quiet")
        self.vmms["mitm"].finish(timeout=60)
        self._finish_destination(b2)
        self.vmms["B"] = b2

    def _run_impersonate(self) -> None:
        mport = self._mitm("--attack", "impersonate", "--quiet", *(["--plain"] if self.plain else []))
        a = self._source(mport)
        a.finish(timeout=300)
        self.vmms["mitm"].finish(timeout=30)

    def _run_toctou(self) -> None:
        b, bport = self._serve(*self._insecure_args(), "--lab-toctou")
        a = self._source(bport)
        a.finish(timeout=300)
        self._finish_destination(b)

    def _run_double_resume(self) -> None:
        b, bport = self._serve(*self._insecure_args())
        a = self._source(bport, "--lab-double-resume")
        a.finish(timeout=300)
        self._finish_destination(b)

    def _run_resume_early(self) -> None:
        b, bport = self._serve(*self._insecure_args(), "--lab-resume-early")
        a = self._source(bport)
        a.finish(timeout=300)
        self._finish_destination(b)

    def _run_rollback(self) -> None:
        old = self.work / "old.mvstate"
        a0 = self._start("A0", "run", GUEST, "--ticks", AFTER, "--save-state", str(old), name="A")
        a0.finish(timeout=300)          # exit 3: the bound ran out, the state is saved
        if not old.exists():
            raise RuntimeError(f"A did not save its state:\n{a0.stderr}")
        self.say(f"A ran the VM for {AFTER} ticks and saved it ({old.name}): the copy the attacker keeps")
        b1, b1port = self._serve(*self._insecure_args(), key="B1", name="B")
        a1 = self._start("A1", "run", str(old), "--restore", "--migrate-to", f"127.0.0.1:{b1port}",
                         "--after", "5", "--timeout", str(2 * TIMEOUT), "--max-rounds", MAX_ROUNDS,
                         "--round-ticks", ROUND_TICKS,
                         *self._insecure_args(), name="A")
        a1.finish(timeout=300)
        self._finish_destination(b1)
        self.say("A restored it and migrated it to B, which ran it to its end; now A's admin restores "
                 "the OLD copy again and migrates it to B once more")
        b2, b2port = self._serve(*self._insecure_args(), key="B", name="B")     # same TPM as B before
        a2 = self._start("A", "run", str(old), "--restore", "--migrate-to", f"127.0.0.1:{b2port}",
                         "--after", "5", "--timeout", str(2 * TIMEOUT), "--max-rounds", MAX_ROUNDS,
                         "--round-ticks", ROUND_TICKS,
                         *self._insecure_args(), name="A")
        a2.finish(timeout=300)
        self._finish_destination(b2)

    def _run_rogue_vmm(self) -> None:
        rogue = "toctou" if "toctou" not in self.insecure else "replay"
        b, bport = self._serve(*self._insecure_args(() if self.plain else (rogue,)))
        if not self.plain:
            self.say(f"B started with --insecure {rogue} (its PCR 10 says so)")
        a = self._source(bport)
        a.finish(timeout=300)
        self._finish_destination(b)

    # ---------------------------------------------------------------- judge
    def judge(self) -> dict:
        a, b, mitm = self.vmms.get("A"), self.vmms.get("B"), self.vmms.get("mitm")
        ca = counts(a.stdout) if a else []
        # A console line the guest was writing when it paused is split across the
        # two hosts ("counter " on A, "7" on B): read B's console after A's unfinished line.
        cb = counts(_unfinished(a.stdout) + b.stdout if a else b.stdout) if b else []
        if self.s.kind == "replay-stream":
            cb1 = counts(self.vmms["B1"].stdout)
            ca = ca + cb1                   # the first, honest migration: A then B
        if self.s.kind == "rollback":       # the honest history: A, saved, restored, migrated to B
            ca = [c for k in ("A0", "A1", "B1") for c in counts(self.vmms[k].stdout)]
        r = {"source_failure": _failure(a), "destination_failure": _failure(b) or self.no_verdict,
             "counts_a": ca, "counts_b": cb,
             "a_rc": a.proc.returncode if a else None}
        r["attacker"] = [line.split("minivmm mitm: ATTACK ", 1)[1].strip() for line in (mitm.err_lines if mitm else [])
                         if "ATTACK " in line]
        hooks = [line.split("LAB HOOK: ", 1)[1].strip() for v in self.vmms.values() for line in v.err_lines
                 if "LAB HOOK: " in line and "is ON" not in line]
        for line in (r["attacker"] + hooks)[:6]:
            self.say(f"attacker: {line}")
        fired = [f for f in (r["destination_failure"], r["source_failure"]) if f]
        if not fired and a is not None and not r["counts_b"] and self.s.kind != "impersonate":
            last = [ln.strip() for ln in a.err_lines if "migrat" in ln]     # say why, whatever it was
            fired = last[-1:]
        damage = self._damage(r)
        r["damage"] = damage
        for f in fired:         # a failure line beside damage is no defence that fired
            label = ("the VMM said (no defence: plain engine)" if self.plain else
                     "the VMM said" if damage else "DEFENCE FIRED")
            self.say(f"{label}: {f}")
        for d in damage:
            self.say(f"DAMAGE: {d}")
        if self.s.name == "eavesdrop" and not damage:
            self.say("the eavesdropper learned no protected secret")
        elif not damage and not fired and r["attacker"] and self.s.kind == "network" and "nothing" not in r["attacker"][0]:
            self.say(f"UNDETECTED: {ATTACKS[self.s.name].plain_damage}")
        if not damage:
            self.say(f"outcome: {self._copies(r)}")
        r["verdict"] = "damage" if damage else ("defended" if fired else "no effect")
        return r

    def _copies(self, r) -> str:
        ca, cb = r["counts_a"], r["counts_b"]
        if r["a_rc"] == 4 and not cb:
            return ("NO copy runs: A committed and B never resumed; A kept the paused guest for "
                    "recovery ('minivmm recover'): availability lost, never two copies")
        seq = ca + cb
        whole = seq == list(range(1, COUNT + 1))
        where = "A and B" if ca and cb else ("A" if ca else "B")
        return (f"exactly one copy ran; the counter went 1..{COUNT} without gap or repeat ({where})" if whole
                else f"counter on A: {_span(ca)}, on B: {_span(cb)}")

    def _damage(self, r) -> list[str]:
        out = []
        leaked = [x for x in r["attacker"] if "LEAKED" in x and SECRET in x]
        if leaked:
            out.append(f"the attacker decrypted the protected secret: {SECRET!r}")
        b = self.vmms.get("B")
        if b is not None and "HACKED!" in b.stdout:
            line = next(x for x in b.stdout.splitlines() if x.startswith("HACKED!"))
            out.append(f"B's console shows {line!r}: the page was changed in transit and accepted")
        ca, cb = r["counts_a"], r["counts_b"]
        if ca and cb and cb[0] <= ca[-1] and not (ca[-1] == COUNT and cb[-1] == COUNT):
            out.append(f"rolled-back counter: A counted to {ca[-1]}, then B went on from {cb[0]}")
        if b is not None and cb and cb[-1] != COUNT and b.proc.returncode is not None and not r["destination_failure"]:
            out.append(f"B's counter stopped at {cb[-1]} (of {COUNT}): the stale or changed memory broke it")
        if self.s.kind == "rollback" and ca and cb:
            out.append(f"rolled back: the VM had run to {ca[-1]}, then the old copy ran again from {cb[0]} "
                       f"on B (counted {_span(cb)} a second time)")
        elif ca and cb and ca[-1] == COUNT and cb[-1] == COUNT:
            out.append(f"two copies: A counted {_span(ca)} and B counted {_span(cb)}: both ran")
        if any("RECEIVED the VM" in x for x in r["attacker"]):
            out.append("the impostor received the whole VM; the source stopped its own copy")
        if self.s.kind in ("toctou", "rogue-vmm") and cb and not r["source_failure"]:
            if self.plain:
                out.append("B got the VM and its process keys: the plain engine checks nothing about B")
            elif self.s.kind == "toctou":
                out.append("B's PCR 9 changed after attestation and B still got the process keys")
            else:
                out.append("the VM and its process keys went to B, a VMM running with a defence off")
        return [d for d in out if d]


def _unfinished(console: str) -> str:
    """The last line of ``console`` if it has no newline yet (else "")."""
    return "" if console.endswith("\n") else console.rpartition("\n")[2]


def _span(c: list[int]) -> str:
    return f"{c[0]}..{c[-1]}" if c else "nothing"


def run(name: str, **kw) -> dict:
    return Lab(name, **kw).run()
