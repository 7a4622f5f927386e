"""LAB-ONLY hooks on ``serve`` and ``run``: host attacks for the migration lab.

These options make a VMM misbehave on purpose, so a student can see what the
secure protocol does about a hostile or broken host.  They exist only for
the lab (docs/lab-migration.md), print a LAB HOOK line whenever they act,
and are never needed for anything else.

* ``serve --lab-toctou``: the destination extends PCR 9 (as if a module were
  loaded or the VMM reconfigured) after attestation and before key release,
  the moment the source's fresh nonce arrives.  The secure source's fresh
  quote shows the change and no key is released; and the release key is
  TPM-sealed to the attested PCRs anyway.
* ``serve --lab-resume-early``: the destination resumes the guest as soon as
  it holds all of it (pages, state, and in secure mode the released keys),
  without waiting for COMMIT: it closes the connection instead of sending
  PREPARED, and runs its copy.  The source, cut off before COMMIT, resumes
  its own: two copies.  A real VMM would need different code to do this
  (PCR 8 would show it), so the hook is measured into PCR 10 with the
  protection policy (``behaviour``), where the attestation policy looks: a
  secure source refuses such a destination before anything crosses (with
  ``--insecure attestation`` it does not: the two copies again).
* ``run --lab-double-resume``: after a migration the destination confirmed,
  the source resumes its own copy too.  In plain mode two copies run; in
  secure mode the source destroyed its process keys before COMMIT (and marked
  the VM migrated-away), so its copy of the protected process cannot run.
"""

from __future__ import annotations

import hashlib
import sys

from migrate.wire import RecordType

WARNING = "LAB ONLY (docs/lab-migration.md): makes this VMM misbehave on purpose; never use it otherwise"


def say(role: str, text: str) -> None:
    print(f"minivmm {role}: LAB HOOK: {text}", file=sys.stderr, flush=True)


def add_serve_options(p) -> None:
    g = p.add_argument_group("LAB ONLY hooks (docs/lab-migration.md)", WARNING)
    g.add_argument("--lab-toctou", action="store_true",
                   help="LAB ONLY: extend PCR 9 after attestation, before key release (a TOCTOU host)")
    g.add_argument("--lab-resume-early", action="store_true",
                   help="LAB ONLY: resume the received guest without waiting for COMMIT (measured into "
                        "PCR 10: a secure source refuses this destination)")


def add_run_options(p) -> None:
    g = p.add_argument_group("LAB ONLY hooks (docs/lab-migration.md)", WARNING)
    g.add_argument("--lab-double-resume", action="store_true",
                   help="LAB ONLY: after a confirmed migration, resume the guest here as well")


def announce(args, role: str) -> None:
    for flag in ("lab_toctou", "lab_double_resume", "lab_resume_early"):
        if getattr(args, flag, False):
            say(role, f"--{flag.replace('_', '-')} is ON. {WARNING}")


def apply_destination(args, mode):
    """Wrap a destination session's mode with the hooks asked for."""
    if not getattr(args, "lab_toctou", False):
        return mode
    tpm_dir = getattr(getattr(mode, "attestor", None), "tpm_dir", None)
    take = mode.take

    def hooked(ch, rec):
        if rec.type is RecordType.FRESH_NONCE:
            extend_pcr9(tpm_dir, getattr(mode, "attestor", None))
        return take(ch, rec)
    if tpm_dir is None:
        say("serve", "toctou: plain mode has no attestation; nothing checks this host's PCRs")
    mode.take = hooked
    return mode


def extend_pcr9(tpm_dir, attestor) -> None:
    if attestor is None:
        return
    from tpm import EventType
    attestor.tpm.extend(9, hashlib.sha256(b"lab: reconfigured after attestation").digest(),
                        event_type=EventType.MANUAL, data=b"lab toctou hook: reconfigured after attestation")
    say("serve", "toctou: extended PCR 9 after attestation, before key release")


def double_resume(args, machine) -> bool:
    """Whether to run the migrated-away guest here too (the hook is on and the
    guest can run: in secure mode its protected processes have no key here)."""
    if not getattr(args, "lab_double_resume", False):
        return False
    say("run", "double-resume: the guest migrated, but this VMM tries to resume its own copy too")
    prot = machine.protection
    keys = getattr(prot, "_keys", {})
    locked = [f"pid {p.pid} ({p.name})" for p in prot.procs.values()
              if not p.exited and p.key_handle not in keys]
    if locked:
        say("run", f"double-resume: REFUSED: no process key here for {', '.join(locked)}: the secure "
                   f"protocol destroyed it before COMMIT (and marked the VM migrated-away); a second "
                   f"copy of a protected process cannot run")
        return False
    say("run", "double-resume: every process key is still here: RUNNING A SECOND COPY")
    return True


def behaviour(args) -> list[str]:
    """The protocol behaviours the lab hooks change (measured into PCR 10)."""
    return ["resume-without-commit"] if getattr(args, "lab_resume_early", False) else []


class ResumeEarly:
    """``serve --lab-resume-early``: a step hook that cuts the connection where
    PREPARED would go out (everything, keys included, has arrived), so the
    destination's engine fails; ``serve`` then runs ``Destination.machine``."""

    def __init__(self, channel):
        self.channel = channel
        self.fired = False

    def __call__(self, step) -> None:
        if step.direction == "send" and step.rtype == "PREPARED":
            self.fired = True
            say("serve", "resume-early: everything has arrived; closing the connection instead of "
                         "sending PREPARED, and resuming WITHOUT COMMIT")
            self.channel.close()


def wrap_destination_channel(factory, args, hooks: list):
    """The destination's channel factory with the resume-early hook (kept in ``hooks``)."""
    if not getattr(args, "lab_resume_early", False):
        return factory
    from migrate.steps import attach

    def make(sock, timeout):
        ch = factory(sock, timeout=timeout)
        hook = ResumeEarly(ch)
        hooks.append(hook)
        previous = ch.on_step                   # --fault / --trace-steps, when also on
        if previous is None:
            return attach(ch, hook)

        def both(step):
            previous(step)
            hook(step)
        return attach(ch, both)
    return make


def resumed_early(args, hooks: list, dest):
    """The machine to run after a failed session, if the resume-early hook cut it
    with everything received; None otherwise."""
    if not (getattr(args, "lab_resume_early", False) and hooks and hooks[-1].fired):
        return None
    machine = getattr(dest, "machine", None)
    if machine is not None:
        say("serve", "resume-early: RUNNING THE GUEST HERE WITHOUT COMMIT (the source may run it too)")
    return machine
