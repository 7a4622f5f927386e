"""Attestation policy: which measurements a verifier approves.

A policy names a set of PCRs and, for each, the measurements (event type + digest)
that are approved in it.  Evidence satisfies the policy when

1. the quote covers every PCR the policy names;
2. each of those PCRs was measured at least once (an all-zero PCR proves nothing);
3. every event the (replayed, signature-checked) log records for those PCRs is an
   approved one — a single unapproved extend, e.g. a student's ``minivmm-tpm
   extend``, makes the host fail.

Approving events rather than final PCR values lets one policy accept several
approved VMM builds or configurations (list each digest) without enumerating
every combination.  PCRs outside the policy are not judged.

JSON form (``minivmm-tpm policy`` writes it from a host's event log)::

    {
      "format": "minivmm-attestation-policy",
      "version": 1,
      "pcrs": {
        "8":  [{"type": "vmm-code",   "digest": "<64 hex>", "note": "..."}],
        "9":  [{"type": "vmm-config", "digest": "<64 hex>"}],
        "10": [{"type": "vmm-policy", "digest": "<64 hex>"}]
      }
    }

``note`` is for humans and is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import PolicyFormatError, PolicyViolationError
from .eventlog import Event, EventType
from .pcr import DIGEST_SIZE, NUM_PCRS, PcrSelection

POLICY_FORMAT = "minivmm-attestation-policy"
POLICY_VERSION = 1
MAX_APPROVED_PER_PCR = 256
MAX_POLICY_BYTES = 1024 * 1024


class AttestationPolicy:
    def __init__(self, approved: dict[int, Iterable[tuple[EventType, bytes]]], notes: dict | None = None):
        table: dict[int, frozenset[tuple[EventType, bytes]]] = {}
        for pcr, entries in approved.items():
            entries = frozenset((EventType(t), bytes(d)) for t, d in entries)
            if not entries:
                raise PolicyFormatError(f"policy approves nothing for PCR {pcr}")
            table[int(pcr)] = entries
        if not table:
            raise PolicyFormatError("policy names no PCRs (it would approve anything)")
        self.pcrs = PcrSelection(table)  # validates indices
        self._approved = table
        self._notes = dict(notes or {})

    def approved(self, pcr: int) -> frozenset[tuple[EventType, bytes]]:
        return self._approved.get(pcr, frozenset())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AttestationPolicy) and other._approved == self._approved

    # ------------------------------------------------------------ building
    @classmethod
    def from_events(
        cls, events: Iterable[Event], pcrs: PcrSelection | Iterable[int] | None = None
    ) -> "AttestationPolicy":
        """Approve exactly the given events (in ``pcrs``, default: every PCR they touch)."""
        events = list(events)
        wanted = set(pcrs) if pcrs is not None else {e.pcr for e in events}
        table: dict[int, set] = {i: set() for i in wanted}
        notes: dict = {}
        for e in events:
            if e.pcr in wanted:
                table[e.pcr].add((e.type, e.digest))
                notes[(e.pcr, e.type, e.digest)] = _note(e)
        missing = [i for i, s in table.items() if not s]
        if missing:
            raise PolicyFormatError(f"no events to approve for PCR(s) {missing}")
        return cls(table, notes)

    def merge(self, other: "AttestationPolicy") -> "AttestationPolicy":
        """A policy approving what either approves (e.g. two VMM versions)."""
        table: dict[int, set] = {}
        for src in (self, other):
            for pcr, entries in src._approved.items():
                table.setdefault(pcr, set()).update(entries)
        return AttestationPolicy(table, {**self._notes, **other._notes})

    # ------------------------------------------------------------ checking
    def check(self, events: Iterable[Event], selection: PcrSelection) -> list[Event]:
        """Raise PolicyViolationError unless the events satisfy the policy.

        ``events`` must already be verified (replayed against a signed quote).
        Returns the events of the policy's PCRs.
        """
        for pcr in self.pcrs:
            if pcr not in selection:
                raise PolicyViolationError(f"quote does not cover PCR {pcr}, which the policy requires")
        judged = [e for e in events if e.pcr in self._approved]
        for pcr in self.pcrs:
            if not any(e.pcr == pcr for e in judged):
                raise PolicyViolationError(f"PCR {pcr} was never measured")
        for e in judged:
            if (e.type, e.digest) not in self._approved[e.pcr]:
                raise PolicyViolationError(
                    f"unapproved measurement in PCR {e.pcr}: {e.type.label} "
                    f"{e.digest.hex()[:16]}... ({_note(e)})"
                )
        return judged

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        pcrs = {}
        for pcr in self.pcrs:
            entries = []
            for etype, digest in sorted(self._approved[pcr], key=lambda x: (int(x[0]), x[1])):
                entry = {"type": etype.label, "digest": digest.hex()}
                note = self._notes.get((pcr, etype, digest))
                if note:
                    entry["note"] = note
                entries.append(entry)
            pcrs[str(pcr)] = entries
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "pcrs": pcrs}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, doc: object) -> "AttestationPolicy":
        if not isinstance(doc, dict):
            raise PolicyFormatError("policy must be a JSON object")
        if doc.get("format") != POLICY_FORMAT:
            raise PolicyFormatError(f"not a {POLICY_FORMAT} document")
        version = doc.get("version")
        # (type first: JSON true and 1.0 compare equal to 1 in Python)
        if type(version) is not int or version != POLICY_VERSION:
            raise PolicyFormatError(f"unsupported policy version {doc.get('version')!r}")
        pcrs = doc.get("pcrs")
        if not isinstance(pcrs, dict) or not pcrs:
            raise PolicyFormatError("policy 'pcrs' must be a non-empty object")
        table: dict[int, set] = {}
        notes: dict = {}
        for key, entries in pcrs.items():
            # Decimal as written by to_json: "08" or a non-ASCII digit would name
            # the same PCR as "8", and the later key would replace the earlier one.
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key
                    and int(key) < NUM_PCRS):
                raise PolicyFormatError(f"bad PCR index {key!r}")
            if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_APPROVED_PER_PCR:
                raise PolicyFormatError(f"PCR {key}: expected a list of 1..{MAX_APPROVED_PER_PCR} entries")
            pcr = int(key)
            table[pcr] = set()
            for entry in entries:
                if not isinstance(entry, dict):
                    raise PolicyFormatError(f"PCR {key}: entries must be objects")
                try:
                    etype = EventType.from_label(entry.get("type"))
                except ValueError:
                    raise PolicyFormatError(f"PCR {key}: unknown event type {entry.get('type')!r}") from None
                digest_hex = entry.get("digest")
                try:
                    if not isinstance(digest_hex, str) or len(digest_hex) != 2 * DIGEST_SIZE:
                        raise ValueError
                    digest = bytes.fromhex(digest_hex)
                except ValueError:
                    raise PolicyFormatError(f"PCR {key}: digest must be 64 hex digits") from None
                table[pcr].add((etype, digest))
                if isinstance(entry.get("note"), str):
                    notes[(pcr, etype, digest)] = entry["note"]
        return cls(table, notes)

    @classmethod
    def loads(cls, text: str | bytes) -> "AttestationPolicy":
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyFormatError("policy document too large")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise PolicyFormatError(f"policy is not valid JSON: {e}") from None
        return cls.from_json(doc)

    @classmethod
    def load(cls, path: Path | str) -> "AttestationPolicy":
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_POLICY_BYTES + 1)
        except OSError as e:
            raise PolicyFormatError(f"cannot read policy {path}: {e.strerror}") from None
        return cls.loads(text)


def _note(e: Event) -> str:
    text = e.describe()
    if e.type == EventType.VMM_CODE:
        files = max(0, text.count("\n") - 1)
        return f"code manifest of {files} file(s)"
    first = text.splitlines()[0] if text else ""
    return first[:80]
