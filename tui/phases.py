"""The protocol's phases: which phase a record belongs to, and what each one
is for (the help panel), with the obligation of DESIGN §6 it serves."""

from __future__ import annotations

# In protocol order.  A phase never goes back: a record of an earlier phase
# seen later (the secure WELCOME after the attestation) stays in the later one.
PHASES = ("boot", "handshake", "attestation", "precopy", "stopcopy", "keyrelease", "prepare",
          "commit", "resume", "done", "aborted")

TITLES = {"boot": "Boot", "handshake": "Handshake", "attestation": "Attestation + keys",
          "precopy": "Pre-copy", "stopcopy": "Stop-and-copy", "keyrelease": "Key release",
          "prepare": "Prepared", "commit": "Commit", "resume": "Resume", "done": "Done",
          "aborted": "Aborted"}

SECURE_ONLY = ("attestation", "keyrelease")

HELP = {
    "boot": ("The guest boots on the source VMM (A) and runs its demo workload: a protected "
             "counter, a memory checker and a page dirtier. The destination VMM (B) listens on a "
             "loopback port. Nothing has crossed the wire yet."),
    "handshake": ("A connects to B and sends HELLO (RAM size, VM name); B answers WELCOME or "
                  "refuses (busy, wrong version). Every field is bounded before it is parsed "
                  "(obligation 7, hostile stream)."),
    "attestation": ("Both VMMs exchange ephemeral key shares and TPM quotes over a fresh nonce "
                    "and the transcript; each checks the other's PCRs against its policy and "
                    "fails closed. Serves obligations 1 (attestation before trust) and 2 (keys "
                    "bound to what was attested): from here on every record is sealed."),
    "precopy": ("A sends guest RAM while the guest keeps running; pages the guest dirties "
                "meanwhile go again in the next round. Protected pages leave only sealed under "
                "their process key (obligation 3); sequence numbers and per-page versions stop "
                "replays (obligation 5)."),
    "stopcopy": ("The guest is paused on A; the last dirty pages, the machine state document and "
                 "the completeness digest go to B. The digest proves nothing was dropped "
                 "(obligation 5); the downtime is measured from here."),
    "keyrelease": ("A asks B for a fresh quote and only then releases the process keys inside "
                   "the sealed channel: a destination whose measured state changed since "
                   "attestation gets nothing (obligations 3 and 4, TOCTOU)."),
    "prepare": ("B checked the digest and the state document field by field and restored the "
                "machine, but does not run it: it answers PREPARED and waits for COMMIT "
                "(obligation 6, resumption order)."),
    "commit": ("A's point of no return: it marks its copy migrated-away and sends COMMIT (with "
               "the session's commit token in secure mode). Only now may B resume: exactly one "
               "copy ever runs (obligation 6)."),
    "resume": ("B resumes the guest and confirms with RESUMED; A never runs this VM again. The "
               "downtime is the time from A's pause to B's resume."),
    "done": ("The migration is over: the guest runs on B. Step backward (left arrow) to look "
             "at any earlier step, or restart (r)."),
    "aborted": ("The migration stopped before COMMIT: everything B received is discarded and "
                "the guest runs on at A with its state intact (obligation 6). The message log "
                "shows the rejected or failed record and why."),
}

_BY_RECORD = {
    "HELLO": "handshake", "WELCOME": "handshake",
    "KEY_SHARE": "attestation", "QUOTE": "attestation",
    "ROUND_BEGIN": "precopy", "PAGES": "precopy", "ZERO_PAGES": "precopy", "ROUND_END": "precopy",
    "ROUND_ACK": "precopy",
    "FRESH_NONCE": "stopcopy", "STATE": "stopcopy", "DIGEST": "stopcopy",
    "FINAL_QUOTE": "keyrelease", "KEY_RELEASE": "keyrelease",
    "PREPARED": "prepare", "COMMIT": "commit", "RESUMED": "resume", "ABORT": "aborted",
}


def of_record(rtype: str) -> str:
    return _BY_RECORD.get(rtype, "handshake")


def later(a: str, b: str) -> str:
    """The later of two phases (phases never go back)."""
    return a if PHASES.index(a) >= PHASES.index(b) else b


def label(phase: str, rnd: int | None) -> str:
    if phase == "precopy" and rnd is not None:
        return f"Pre-copy round {rnd}"
    if phase == "stopcopy" and rnd is not None:
        return f"Stop-and-copy (round {rnd})"
    return TITLES[phase]
