"""minivmm-tpm: the command line of the software TPM (also ``python -m tpm``).

A lab session, start to finish::

    minivmm-tpm issuer init lab-issuer                  # instructor: a privacy CA
    minivmm-tpm init --state host-a --issuer lab-issuer
    minivmm-tpm measure --state host-a --code minivmm --config cfg.json --policy prot.json
    minivmm-tpm policy --state host-a --out approved.json   # approve this host's VMM
    N=$(minivmm-tpm nonce)
    minivmm-tpm quote --state host-a --nonce $N --out q.bin
    minivmm-tpm verify --quote q.bin --policy approved.json --nonce $N --issuer lab-issuer
    minivmm-tpm extend --state host-a --pcr 8 --text "rootkit.ko"   # load something unapproved
    minivmm-tpm quote ... && minivmm-tpm verify ...            # now fails: PolicyViolationError

Commands that use a TPM attach to it as it is running (no power cycle); ``reset``
power-cycles it.  The state directory defaults to $MINIVMM_TPM_STATE or
./.minivmm-tpm.  Errors print one line and exit 1 (usage errors exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from .errors import TpmError, VerificationError
from .eventlog import EventType
from .evidence import MAX_EVIDENCE_SIZE
from .issuer import ISSUER_PUB_FILE, Issuer
from .measure import VMM_PCRS, measure_vmm
from .pcr import NUM_PCRS, ZERO_DIGEST, PcrSelection
from .policy import AttestationPolicy
from .quote import MAX_EXTRA_DATA
from .softtpm import SoftTpm
from .statefile import atomic_write_bytes
from .verifier import Verifier

PROG = "minivmm-tpm"


class CliError(Exception):
    """A user-facing error with a one-line message."""


def _default_state() -> Path:
    return Path(os.environ.get("MINIVMM_TPM_STATE", ".minivmm-tpm"))


def _hex(text: str, what: str, max_bytes: int | None = None) -> bytes:
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise CliError(f"{what} must be hex digits") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise CliError(f"{what} is at most {max_bytes} bytes")
    return data


def _pcrs(text: str) -> PcrSelection:
    try:
        return PcrSelection.parse(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1024 * 1024))
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError as e:
        raise CliError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{what} {path} must be a JSON object")
    return doc


def _attach(args) -> SoftTpm:
    return SoftTpm.open(args.state, startup=None, create=False)


def _write_out(path: str | None, data: bytes) -> None:
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        atomic_write_bytes(Path(path), data, mode=0o644)


# ------------------------------------------------------------------ commands
def cmd_issuer_init(args) -> int:
    issuer = Issuer.create(args.dir, args.name)
    print(f"issuer {issuer.name!r} created in {args.dir}")
    print(f"key id      {issuer.key_id.hex()}")
    print(f"trust anchor {Path(args.dir) / ISSUER_PUB_FILE}  (give this to verifiers)")
    return 0


def cmd_issuer_show(args) -> int:
    issuer = Issuer.load(args.dir)
    print(f"issuer  {issuer.name}")
    print(f"key id  {issuer.key_id.hex()}")
    sys.stdout.write(issuer.public_pem().decode())
    return 0


def cmd_init(args) -> int:
    state = Path(args.state)
    if args.issuer:
        issuer = Issuer.load(args.issuer)
    else:
        issuer = Issuer.open(state / "issuer", name=f"{state.resolve().name}-issuer")
    existed = (state / "tpm-state.bin").exists()
    tpm = SoftTpm.open(state, issuer=issuer, host=args.host, startup=None)
    cert = tpm.ak_certificate
    print(f"TPM {'opened' if existed else 'initialised'} in {state}")
    print(f"host        {tpm.host}")
    print(f"AK name     {tpm.ak_name.hex()}")
    print(f"certified by issuer {cert.issuer_key_id.hex()[:16]}... ({issuer.directory})")
    return 0


def cmd_reset(args) -> int:
    # Opening with a TPM Reset discards the volatile state without reading it, so
    # this also recovers a TPM whose volatile.bin was damaged.
    tpm = SoftTpm.open(args.state, startup="clear", create=False)
    ci = tpm.clock_info()
    print(f"TPM reset: PCRs cleared, event log emptied (resetCount={ci.reset_count})")
    return 0


def cmd_info(args) -> int:
    tpm = _attach(args)
    ci = tpm.clock_info()
    cert = tpm.ak_certificate
    print(f"state dir     {tpm.state_dir}")
    print(f"host          {tpm.host}")
    print(f"AK name       {tpm.ak_name.hex()}")
    print(f"AK QN         {tpm.ak_qualified_name.hex()}  (qualifiedSigner of its quotes)")
    print(f"AK issuer     {cert.issuer_key_id.hex() if cert else '(not certified)'}")
    print(f"clock         {ci.clock} ms  resetCount={ci.reset_count} restartCount={ci.restart_count}")
    print(f"event log     {len(tpm.event_log())} event(s)")
    for name, value in tpm.counters():
        print(f"counter       {name} = {value}")
    return 0


def cmd_pcrs(args) -> int:
    tpm = _attach(args)
    values = tpm.pcrs()
    if args.json:
        print(json.dumps({str(i): v.hex() for i, v in enumerate(values)}, indent=2))
        return 0
    shown = 0
    for i, v in enumerate(values):
        if args.all or v != ZERO_DIGEST:
            print(f"PCR {i:2d}: {v.hex()}")
            shown += 1
    if not shown:
        print(f"all {NUM_PCRS} PCRs are zero (nothing measured since the last reset)")
    return 0


def cmd_log(args) -> int:
    tpm = _attach(args)
    log = tpm.event_log()
    if args.json:
        print(json.dumps([e.to_json() for e in log], indent=2))
        return 0
    if not len(log):
        print("event log is empty")
    for n, e in enumerate(log):
        text = e.describe()
        first = text.splitlines()[0] if text else ""
        more = " ..." if "\n" in text.rstrip("\n") else ""
        print(f"#{n:<3d} PCR {e.pcr:2d}  {e.type.label:<10s}  {e.digest.hex()}  {first[:60]}{more}")
    return 0


def cmd_extend(args) -> int:
    tpm = _attach(args)
    if args.digest is not None:
        digest = _hex(args.digest, "--digest")
        if len(digest) != 32:
            raise CliError("--digest must be 32 bytes (64 hex digits)")
        data = (args.text or "manual extend").encode()
    elif args.file is not None:
        try:
            content = Path(args.file).read_bytes()
        except OSError as e:
            raise CliError(f"cannot read {args.file}: {e.strerror}") from None
        digest = hashlib.sha256(content).digest()
        data = f"file {Path(args.file).name}".encode()
    else:
        text = args.text if args.text is not None else "manual extend"
        data = text.encode()
        digest = hashlib.sha256(data).digest()
    value = tpm.extend(args.pcr, digest, event_type=EventType.MANUAL, data=data)
    print(f"PCR {args.pcr:2d}: {value.hex()}")
    return 0


def cmd_measure(args) -> int:
    tpm = _attach(args)
    config = _read_json(args.config, "config") if args.config else {}
    policy = _read_json(args.policy, "protection policy") if args.policy else {}
    events = measure_vmm(tpm, args.code, config, policy, root=args.root)
    for e in events:
        print(f"PCR {e.pcr:2d}  {e.type.label:<10s}  {e.digest.hex()}")
    return 0


def cmd_nonce(args) -> int:
    print(os.urandom(args.bytes).hex())
    return 0


def cmd_quote(args) -> int:
    tpm = _attach(args)
    nonce = _hex(args.nonce, "--nonce", MAX_EXTRA_DATA)
    evidence = tpm.quote(nonce, _pcrs(args.pcrs))
    data = evidence.to_bytes()
    _write_out(args.out, data)
    if args.out not in (None, "-"):
        print(f"quote over PCRs {evidence.attest.selection} written to {args.out} ({len(data)} bytes)")
    return 0


def cmd_export(args) -> int:
    """Split an evidence bundle into the files real TPM 2.0 tools read."""
    from cryptography.hazmat.primitives import serialization

    from . import keys
    from .evidence import Evidence

    try:
        with open(args.quote, "rb") as f:
            data = f.read(MAX_EVIDENCE_SIZE + 1)
    except OSError as e:
        raise CliError(f"cannot read quote {args.quote}: {e.strerror}") from None
    ev = Evidence.from_bytes(data)  # QuoteFormatError for anything malformed or oversized
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"attest.bin": ev.attest_bytes, "signature.bin": ev.signature, "eventlog.bin": ev.eventlog_bytes}
    if ev.certificate is not None:
        ak_key, _ = keys.parse_public_area(ev.certificate.ak_public)
        files["ak.pem"] = ak_key.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, blob in files.items():
        atomic_write_bytes(out / name, blob, mode=0o644)
    print(f"wrote {', '.join(sorted(files))} to {out}")
    print(f"  tpm2_print -t TPMS_ATTEST {out / 'attest.bin'}")
    print(f"  tpm2_eventlog {out / 'eventlog.bin'}")
    if "ak.pem" in files:
        print(f"  tpm2_checkquote -u {out / 'ak.pem'} -m {out / 'attest.bin'} -s {out / 'signature.bin'} "
              f"-g sha256 -q {ev.attest.extra_data.hex()}")
    return 0


def cmd_verify(args) -> int:
    policy = AttestationPolicy.load(args.policy)
    verifier = Verifier(args.issuer)
    nonce = _hex(args.nonce, "--nonce", MAX_EXTRA_DATA)
    try:
        with open(args.quote, "rb") as f:
            evidence = f.read(MAX_EVIDENCE_SIZE + 1)
    except OSError as e:
        raise CliError(f"cannot read quote {args.quote}: {e.strerror}") from None
    result = verifier.verify(evidence, policy, expected_nonce=nonce)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "host": result.host,
                    "ak_name": result.ak_name.hex(),
                    "issuer": result.issuer_key_id.hex(),
                    "clock": result.clock_info.clock,
                    "reset_count": result.clock_info.reset_count,
                    "pcrs": {str(i): v.hex() for i, v in result.pcr_values.items()},
                },
                indent=2,
            )
        )
    else:
        print(f"OK: host {result.host!r} runs an approved VMM")
        print(f"  AK {result.ak_name.hex()[:20]}... certified by {result.issuer_key_id.hex()[:16]}...")
        for i, v in result.pcr_values.items():
            print(f"  PCR {i:2d}: {v.hex()}")
    return 0


def cmd_policy(args) -> int:
    tpm = _attach(args)
    policy = AttestationPolicy.from_events(tpm.event_log(), _pcrs(args.pcrs))
    text = policy.dumps().encode()
    _write_out(args.out, text)
    if args.out not in (None, "-"):
        print(f"policy approving PCRs {policy.pcrs} written to {args.out}")
    return 0


def cmd_counter(args) -> int:
    tpm = _attach(args)
    value = tpm.counter_increment(args.name) if args.increment else tpm.counter_read(args.name)
    print(value)
    return 0


def cmd_seal(args) -> int:
    tpm = _attach(args)
    try:
        data = Path(args.input).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.input}: {e.strerror}") from None
    _write_out(args.out, tpm.seal(data, _pcrs(args.pcrs)))
    return 0


def cmd_unseal(args) -> int:
    tpm = _attach(args)
    try:
        blob = Path(args.input).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.input}: {e.strerror}") from None
    _write_out(args.out, tpm.unseal(blob))
    return 0


# -------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="minivmm's software TPM: PCRs, event log, quotes, attestation, seal, NV counters.",
        epilog="Run '%(prog)s COMMAND --help' for each command. See docs/tpm.md.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_, description=None):
        sp = sub.add_parser(name, help=help_, description=description or help_)
        sp.set_defaults(func=func)
        return sp

    def state(sp):
        sp.add_argument(
            "--state",
            type=Path,
            default=_default_state(),
            help="TPM state directory (default: $MINIVMM_TPM_STATE or ./.minivmm-tpm)",
        )

    # issuer
    sp = sub.add_parser(
        "issuer",
        help="manage an AK certificate issuer (privacy CA)",
        description="An issuer certifies hosts' attestation keys; verifiers trust its public key.",
    )
    isub = sp.add_subparsers(dest="issuer_command", metavar="SUBCOMMAND", required=True)
    ip = isub.add_parser("init", help="create an issuer in DIR", description="Create an issuer key in DIR "
                         "(issuer.bin, private; issuer.pub.pem, the trust anchor for verifiers).")
    ip.add_argument("dir", type=Path, help="issuer directory (must not hold an issuer yet)")
    ip.add_argument("--name", default="minivmm-issuer", help="issuer name (default: %(default)s)")
    ip.set_defaults(func=cmd_issuer_init)
    ip = isub.add_parser("show", help="show an issuer's key id and public key")
    ip.add_argument("dir", type=Path, help="issuer directory")
    ip.set_defaults(func=cmd_issuer_show)

    sp = add("init", cmd_init, "initialise a host TPM (or re-certify an existing one)",
             "Create the TPM state directory (keys, counters) if needed and have the issuer "
             "certify its attestation key. Without --issuer, a private issuer is created in "
             "STATE/issuer.")
    state(sp)
    sp.add_argument("--issuer", type=Path, help="issuer directory to certify the AK with")
    sp.add_argument("--host", help="host label for the AK certificate (default: state directory name)")

    sp = add("reset", cmd_reset, "power-cycle the TPM: clear PCRs and the event log",
             "TPM Reset: PCRs back to zero, event log emptied, resetCount incremented. "
             "Keys, counters and sealed data survive.")
    state(sp)

    sp = add("info", cmd_info, "show the TPM's identity, clock and counters")
    state(sp)

    sp = add("pcrs", cmd_pcrs, "show PCR values (non-zero ones unless --all)")
    state(sp)
    sp.add_argument("--all", action="store_true", help="show all 24 PCRs")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("log", cmd_log, "show the event log")
    state(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("extend", cmd_extend, "extend a PCR by hand (simulate loading something)",
             "Extend a PCR and log a 'manual' event, e.g. to simulate loading unapproved code: "
             "the next quote will fail a policy that does not approve it. The digest is "
             "SHA-256 of --text, of the contents of --file, or given with --digest.")
    state(sp)
    sp.add_argument("--pcr", type=int, default=8, help="PCR index 0-23 (default: 8, the VMM code PCR)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--file", help="measure this file's contents")
    g.add_argument("--digest", help="extend by this 32-byte hex digest (--text becomes the description)")
    sp.add_argument("--text", help="measure this text (default: 'manual extend')")

    sp = add("measure", cmd_measure, "measure a VMM (code, config, protection policy) into PCRs 8-10",
             "What a VMM does at start: PCR 8 <- code manifest, PCR 9 <- config JSON, "
             "PCR 10 <- protection policy JSON, each with an event-log entry.")
    state(sp)
    sp.add_argument("--code", action="append", required=True, help="code file or directory (repeatable)")
    sp.add_argument("--config", help="VMM configuration JSON file (default: {})")
    sp.add_argument("--policy", help="protection policy JSON file (default: {})")
    sp.add_argument("--root", help="directory that file names are relative to (default: common parent)")

    sp = add("nonce", cmd_nonce, "print a fresh random nonce (hex) for a quote")
    sp.add_argument("--bytes", type=int, default=32, choices=range(1, MAX_EXTRA_DATA + 1),
                    metavar="N", help="nonce length, 1-64 (default: 32)")

    sp = add("quote", cmd_quote, "produce a quote (evidence file) over PCRs with a verifier's nonce",
             "Sign the selected PCRs' digest with the attestation key, with the verifier's nonce "
             "as extraData, and write the evidence bundle (quote, signature, event log, AK "
             "certificate).")
    state(sp)
    sp.add_argument("--nonce", required=True, help="the verifier's nonce, hex (up to 64 bytes)")
    sp.add_argument("--pcrs", default=str(VMM_PCRS), help="PCRs to quote (default: %(default)s)")
    sp.add_argument("--out", required=True, help="evidence file to write ('-' for stdout)")

    sp = add("export", cmd_export, "split an evidence file for tpm2_print, tpm2_checkquote, tpm2_eventlog",
             "Write the evidence bundle's parts as the files real TPM 2.0 tools read: attest.bin "
             "(TPMS_ATTEST), signature.bin (TPMT_SIGNATURE), eventlog.bin (TCG crypto-agile event "
             "log) and ak.pem (the certified AK's public key), and print the commands that check them.")
    sp.add_argument("--quote", required=True, help="evidence file from 'quote'")
    sp.add_argument("--dir", required=True, help="directory to write the files to")

    sp = add("verify", cmd_verify, "verify a quote against a policy (fails closed)",
             "Check the AK certificate against the trusted issuer, the quote signature, the "
             "nonce, the event log replay and the policy. Exit 0 only if everything holds.")
    sp.add_argument("--quote", required=True, help="evidence file from 'quote'")
    sp.add_argument("--policy", required=True, help="attestation policy JSON (from 'policy')")
    sp.add_argument("--nonce", required=True, help="the nonce you gave the host, hex")
    sp.add_argument("--issuer", required=True, action="append", type=Path,
                    help="trusted issuer directory or issuer.pub.pem (repeatable)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("policy", cmd_policy, "write a policy approving this host's current measurements",
             "Emit an attestation policy JSON that approves every event now in the log for "
             "the given PCRs (use it to approve a known-good host).")
    state(sp)
    sp.add_argument("--pcrs", default=str(VMM_PCRS), help="PCRs the policy covers (default: %(default)s)")
    sp.add_argument("--out", help="file to write (default: stdout)")

    sp = add("counter", cmd_counter, "read (or --increment) a monotonic NV counter")
    state(sp)
    sp.add_argument("name", help="counter name (A-Z a-z 0-9 . _ : -)")
    sp.add_argument("--increment", action="store_true", help="increment it and print the new value")

    sp = add("seal", cmd_seal, "seal a file to the current PCR values")
    state(sp)
    sp.add_argument("--pcrs", default=str(VMM_PCRS), help="PCRs the seal depends on (default: %(default)s)")
    sp.add_argument("--in", dest="input", required=True, help="file to seal")
    sp.add_argument("--out", required=True, help="sealed blob to write")

    sp = add("unseal", cmd_unseal, "unseal a blob (fails if the selected PCRs changed)")
    state(sp)
    sp.add_argument("--in", dest="input", required=True, help="sealed blob")
    sp.add_argument("--out", help="file to write the data to (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VerificationError as e:
        print(f"{PROG}: verification FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    except TpmError as e:
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    except FileExistsError as e:
        print(f"{PROG}: error: {e.args[0] if e.args else e}", file=sys.stderr)
    except OSError as e:
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
