"""The secure protocol's command-line options, shared by ``serve``, ``run
--migrate-to`` and ``demo`` (``migrate/cli.py`` calls these; it keeps only seams).

* ``--plain``: today's engine, no attestation, no encryption (the baseline).
* ``--insecure DEFENCE`` (repeatable): turn exactly that defence off, printed
  loudly and measured into PCR 10, so a secure peer's policy refuses this VMM.
* ``--issuer PATH``: the trusted issuer (its directory or ``issuer.pub.pem``);
  if the directory holds the issuer's private key (a local issuer) this VMM's
  TPM AK is certified with it at start.
* ``--attest-policy FILE``: the approved measurements (``minivmm attest-setup``).
"""

from __future__ import annotations

import os
from pathlib import Path

from migrate.secure.mode import INSECURE, PlainMode, SecureMode


def base_dir() -> Path:
    return Path(os.environ.get("MINIVMM_TPM_STATE", ".minivmm-tpm"))


def add_options(g) -> None:
    g.add_argument("--plain", action="store_true",
                   help="plain mode: no attestation, no encryption (the baseline; default: the secure "
                        "protocol, docs/protocol.md)")
    g.add_argument("--insecure", action="append", default=[], choices=INSECURE, metavar="DEFENCE",
                   help="turn ONE defence of the secure protocol off, for teaching (repeatable): "
                        + ", ".join(INSECURE) + ". Measured into PCR 10: a secure peer refuses it")
    g.add_argument("--issuer", metavar="PATH",
                   help="trusted AK certificate issuer: its directory or issuer.pub.pem "
                        "(default $MINIVMM_TPM_STATE/issuer or .minivmm-tpm/issuer)")
    g.add_argument("--attest-policy", metavar="FILE",
                   help="policy of approved VMM measurements (default $MINIVMM_TPM_STATE/policy.json "
                        "or .minivmm-tpm/policy.json; make it with 'minivmm attest-setup')")


def check(args) -> None:
    if getattr(args, "plain", False) and getattr(args, "insecure", None):
        raise ValueError("--insecure switches defences of the secure protocol off; "
                         "with --plain there are none (use one or the other)")


def mode_name(args) -> str:
    return "plain" if getattr(args, "plain", False) else "secure"


def issuer_path(args) -> Path:
    return Path(args.issuer) if getattr(args, "issuer", None) else base_dir() / "issuer"


def policy_path(args) -> Path:
    return Path(args.attest_policy) if getattr(args, "attest_policy", None) else base_dir() / "policy.json"


def announce(args) -> str:
    if mode_name(args) == "plain":
        return "migration mode: PLAIN (no attestation, no encryption)"
    off = sorted(set(args.insecure or ()))
    if off:
        return ("migration mode: secure, BUT INSECURE: defence(s) OFF: " + ", ".join(off)
                + " -- measured into PCR 10; a secure peer will refuse this VMM")
    return "migration mode: secure (attestation, sealed channel, key release, replay and order defences)"


def prepare(args, tpm_dir: Path) -> str | None:
    """At start, in secure mode: certify this TPM's AK with a local issuer (if
    its private key is here), check the trust files exist (fail early) and
    measure them into PCR 10 (``migrate.secure.trust``); returns what was
    measured, in words."""
    if mode_name(args) == "plain":
        return None
    from tpm import Issuer, SoftTpm
    from tpm.errors import TpmError
    issuer = issuer_path(args)
    try:
        local = Issuer.load(issuer) if issuer.is_dir() else None
    except (TpmError, OSError):
        local = None                # only the public key here: the AK was certified elsewhere
    if local is not None:
        SoftTpm.open(tpm_dir, startup=None, issuer=local)
    missing = [str(p) for p in (issuer, policy_path(args)) if not p.exists()]
    if missing:
        raise ValueError(f"the secure protocol needs a trusted issuer and a policy; missing: "
                         f"{', '.join(missing)}. Create them with 'minivmm attest-setup' (or run both "
                         f"ends with --plain)")
    # What this VMM trusts is part of what it is: measured into PCR 10, so a
    # peer's policy refuses a VMM started with another issuer or policy.
    from migrate.secure import trust
    event = trust.measure(tpm_dir, issuer, policy_path(args))
    args.trust_digest = event.digest
    return trust.describe(event)


def session_mode(args, tpm_dir: Path):
    """A fresh mode object for one migration session."""
    if mode_name(args) == "plain":
        return PlainMode()
    from migrate.secure.attest import Attestor
    return SecureMode(Attestor(tpm_dir, issuer_path(args), policy_path(args),
                               trust=getattr(args, "trust_digest", None)),
                      insecure=tuple(args.insecure or ()))


def channel_factory(args, role: str):
    """What ``Server`` makes of an accepted connection."""
    if mode_name(args) == "plain":
        from migrate.wire import Channel
        return Channel
    from migrate.secure.channel import SealedChannel
    off = set(args.insecure or ())
    return lambda sock, timeout: SealedChannel(sock, timeout=timeout, role=role,
                                               encryption="encryption" not in off,
                                               replay="replay" not in off)


def add_setup_command(sub) -> None:
    s = sub.add_parser("attest-setup", help="create the issuer and the attestation policy of the secure protocol",
                       description="Create (once) a local AK certificate issuer and write a policy that "
                                   "approves this VMM build in the secure configuration (PCR 8: code, "
                                   "PCR 10: protection and migration policy). VMMs started with this "
                                   "directory's issuer certify their TPM with it. For two machines: run "
                                   "it on one, copy the directory to the other.")
    s.add_argument("--dir", metavar="DIR", help="where (default $MINIVMM_TPM_STATE or .minivmm-tpm)")
    s.add_argument("--approve-insecure", action="append", default=[], choices=INSECURE, metavar="DEFENCE",
                   help="also approve a VMM running with this one defence off (labs; repeatable: one "
                        "configuration each)")

    def run(a) -> int:
        from migrate.secure.setup import setup
        base = Path(a.dir) if a.dir else base_dir()
        configs = [{}] + [{"insecure": (d,)} for d in a.approve_insecure]
        issuer, policy = setup(base, configs)
        print(f"issuer: {issuer}\npolicy: {policy} (approves this build, secure"
              + "".join(f"; and with --insecure {d}" for d in a.approve_insecure) + ")")
        return 0
    s.set_defaults(func=run)


def add_recover_command(sub) -> None:
    r = sub.add_parser("recover", help="continue a guest sealed after an unconfirmed secure commit",
                       description="Open a recovery file written after a secure migration whose commit "
                                   "was never confirmed (this host's TPM must still hold the measured "
                                   "state it was sealed under) and run the guest to the end. ONLY if "
                                   "the destination did not resume it: otherwise two copies run.")
    r.add_argument("file", help="the .sealed recovery file")
    r.add_argument("--tpm-dir", metavar="DIR", help="this host's TPM (default: the source role's)")
    r.add_argument("--save-state", metavar="FILE", help="save the final machine state (no migration)")

    def run(a) -> int:
        from minivmm.machine import Machine
        from minivmm.state import MachineState
        from migrate.measure import default_tpm_dir
        from migrate.secure.commit import open_recovery
        from tpm import SoftTpm
        from tpm.errors import TpmError
        tpm_dir = Path(a.tpm_dir) if a.tpm_dir else default_tpm_dir("source")
        try:
            data = open_recovery(a.file, SoftTpm.open(tpm_dir, startup=None, create=False))
        except TpmError as exc:
            raise ValueError(f"this host's TPM refuses to open {a.file}: {exc}") from None
        machine = Machine.restore(MachineState.from_bytes(data, where=a.file))
        from migrate.cli import _stream, run_guest
        a.migrate_to = None
        from migrate.secure.statekeys import TpmKeyWrap
        a.key_wrap = TpmKeyWrap(tpm_dir)        # --save-state: the keys sealed again
        _stream(machine, a)
        return run_guest(machine, a, role="source")
    r.set_defaults(func=run)
