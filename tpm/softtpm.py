"""SoftTpm: one host's software TPM, with its persistent state in a directory.

What persists and what does not follows TPM 2.0:

* **Persistent** (``tpm-state.bin``): the attestation key, the storage key that
  seals data, an internal *proof* secret that authenticates the other state files,
  the clock, resetCount/restartCount, the host label and the AK certificate.
  (``nvcounters.bin``): the NV counters.  These survive any restart.
* **Volatile** (``volatile.bin``): the event log of the current boot.  The PCRs are
  *derived* from it by replay, so the two can never disagree.  A TPM Reset
  (``startup="clear"``, the default for a new ``SoftTpm`` instance — think "the
  host was power-cycled") discards it: all PCRs start at zero again, resetCount is
  incremented and restartCount set to 0, exactly like TPM2_Startup(TPM_SU_CLEAR)
  after a power loss.  ``startup=None`` *attaches* to the TPM as it is running
  (no startup at all: PCRs, log and counts unchanged) — what the CLI does, so that
  ``extend`` in one command is seen by ``quote`` in the next, and what a tool does
  that talks to the TPM a running VMM measured itself into.  ``startup="state"``
  models TPM Resume (PCRs kept, restartCount + 1).

The volatile and counters files carry an HMAC under keys derived from the proof
secret, modelling "only the TPM can write its own state"; the main state file
carries a SHA-256 checksum.  Every file is versioned, bounded and checked before
parsing (CorruptStateError names the file), and written atomically.

Every public operation takes an advisory lock on the directory and re-reads the
state, so a VMM and the CLI may share one host TPM from two processes.  "Re-reads"
is exact only for files that changed: each file's identity (device, inode, size,
mtime and ctime in ns) is kept with what was parsed from it, and a file whose
identity is unchanged since this instance last read or wrote it is not read,
checked and parsed again (that cost ~1 ms per command, several per migration
handshake and one inside its downtime).  Any write -- another process's atomic
replace (a new inode) or an in-place edit (a new ctime, which no user can set
back) -- changes the identity, so the next command reloads and checks the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from . import keys, seal as _seal, statefile
from .errors import (
    CorruptStateError,
    CounterError,
    FormatError,
    NoTpmStateError,
    RestrictedKeyError,
    TpmError,
)
from .evidence import Evidence
from .eventlog import MAX_EVENTLOG_BYTES, Event, EventLog, EventType
from .issuer import CERT_VERSION, MAX_CERT_SIZE, MAX_LABEL, AkCertificate, Issuer
from .marshal import Reader, Writer
from .measure import VMM_PCRS
from .nvcounter import NvCounters
from .pcr import PcrBank, PcrSelection, check_index
from .quote import (
    FIRMWARE_VERSION,
    MAX_EXTRA_DATA,
    TPM_GENERATED_BYTES,
    Attest,
    ClockInfo,
)

STATE_FILE = "tpm-state.bin"
VOLATILE_FILE = "volatile.bin"
COUNTERS_FILE = "nvcounters.bin"
STATE_MAGIC = 0x4D565453  # "MVTS"
VOLATILE_MAGIC = 0x4D565456  # "MVTV"
COUNTERS_MAGIC = 0x4D564E43  # "MVNC"
STATE_VERSION = 1
#: volatile.bin v2: the event log inside is the TCG crypto-agile log (v1: "MVEL").
VOLATILE_VERSION = 2
MAX_STATE_PAYLOAD = 4096
#: How far ahead of the reported clock the persisted clock is written (ms).  A quote
#: reports the clock; it must never report a value a restarted TPM could report
#: again, so the persisted clock must be >= every reported value.  Writing it at
#: every quote cost an fsync (~10 ms) per quote; instead a quote that finds the
#: clock past the persisted value persists ``now + CLOCK_RESERVE_MS`` (a real TPM
#: also updates its NV clock only now and then).  A restart resumes from the
#: persisted value: ahead of all reported ones, so still monotonic and unique.
CLOCK_RESERVE_MS = 60_000
MAX_COUNTERS_PAYLOAD = 16 * 1024
#: The PCRs a VMM measurement extends (see tpm.measure): the default quote/seal selection.
DEFAULT_PCRS = VMM_PCRS


@dataclass(frozen=True)
class PersistentState:
    """Contents of tpm-state.bin (everything that survives a TPM Reset but the counters)."""

    ak_private: bytes
    storage_key: bytes
    proof: bytes
    clock: int
    reset_count: int
    restart_count: int
    nv_generation: int
    host: str
    ak_certificate: bytes  # empty: not certified yet

    def to_bytes(self) -> bytes:
        return (
            Writer()
            .tpm2b(self.ak_private, 32)
            .tpm2b(self.storage_key, 32)
            .tpm2b(self.proof, 32)
            .u64(self.clock)
            .u32(self.reset_count)
            .u32(self.restart_count)
            .u64(self.nv_generation)
            .tpm2b(self.host.encode("utf-8"), MAX_LABEL)
            .tpm2b(self.ak_certificate, MAX_CERT_SIZE)
            .bytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "PersistentState":
        r = Reader(data, "TPM state")
        ak = r.tpm2b(32, "akPrivate", exact=32)
        storage = r.tpm2b(32, "storageKey", exact=32)
        proof = r.tpm2b(32, "proof", exact=32)
        clock = r.u64("clock")
        reset = r.u32("resetCount")
        restart = r.u32("restartCount")
        gen = r.u64("nvGeneration")
        try:
            host = r.tpm2b(MAX_LABEL, "host").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("TPM state: host label is not UTF-8") from None
        cert = r.tpm2b(MAX_CERT_SIZE, "akCertificate")
        r.end()
        keys.private_from_bytes(ak)  # validates the scalar
        if cert:
            AkCertificate.from_bytes(cert)
        return cls(ak, storage, proof, clock, reset, restart, gen, host, cert)


@dataclass(frozen=True)
class VolatileState:
    """Contents of volatile.bin: the boot (resetCount) it belongs to and its event log."""

    reset_count: int
    event_log: EventLog

    def to_bytes(self) -> bytes:
        return Writer().u32(self.reset_count).blob32(self.event_log.to_bytes(), MAX_EVENTLOG_BYTES).bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "VolatileState":
        r = Reader(data, "volatile state")
        reset = r.u32("resetCount")
        log = EventLog.from_bytes(r.blob32(MAX_EVENTLOG_BYTES, "eventLog"))
        r.end()
        return cls(reset, log)


def _derive(proof: bytes, label: bytes) -> bytes:
    return hmac.new(proof, b"minivmm-tpm\0" + label, hashlib.sha256).digest()


class SoftTpm:
    """A host's software TPM.  Create/open with :meth:`open`."""

    def __init__(self, state_dir: Path) -> None:
        # Use SoftTpm.open(); the constructor only sets up empty fields.
        self.state_dir = Path(state_dir)
        self._persist: PersistentState | None = None
        self._log = EventLog()
        self._counters = NvCounters()
        self._ak: ec.EllipticCurvePrivateKey | None = None
        self._clock_base = 0
        self._t0 = time.monotonic()
        self._depth = 0
        self._mutex = threading.RLock()
        self._reserved = None  # the clock value this instance persisted ahead (a reservation)
        # file name -> identity (os.stat fields) of the version whose content is in
        # this instance (read and checked by _load, or written by _write_*).
        self._seen: dict[str, tuple] = {}
        self._dir = str(self.state_dir)     # (os.path on it: pathlib cost ~10 us a stat)
        self._mac_keys: dict[tuple[bytes, bytes], bytes] = {}
        self._ek_qn: tuple[bytes, bytes] | None = None      # (proof, EK qualified name)
        self._replayed: tuple[EventLog, int, PcrBank] | None = None   # (log, len(log), bank)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        *,
        issuer: Issuer | None = None,
        host: str | None = None,
        startup: str | None = "clear",
        create: bool = True,
    ) -> "SoftTpm":
        """Open (creating on first use) the TPM whose state lives in ``state_dir``.

        ``startup="clear"``: TPM Reset (power cycle) — PCRs and event log start
        empty, resetCount + 1, restartCount = 0.  A newly created TPM starts at
        resetCount 0.
        ``startup="state"``: TPM Resume (Shutdown(STATE) + Startup(STATE), e.g. after
        hibernation) — PCRs and event log kept, restartCount + 1.
        ``startup=None``: attach to the running TPM without a startup (PCRs kept).
        ``issuer``: certify the AK with it (if not already certified by that issuer).
        ``host``: label written into the AK certificate (default: directory name).
        ``create=False``: raise NoTpmStateError instead of creating a new TPM.
        """
        if startup not in ("clear", "state", None):
            raise ValueError("startup must be 'clear', 'state' or None")
        state_dir = Path(state_dir)
        tpm = cls(state_dir)
        if not (state_dir / STATE_FILE).exists():
            if not create:
                raise NoTpmStateError(f"no TPM state in {state_dir} (run 'minivmm-tpm init' first)")
            if (state_dir / COUNTERS_FILE).exists() or (state_dir / VOLATILE_FILE).exists():
                raise CorruptStateError(state_dir / STATE_FILE, "missing (other TPM files present)")
            state_dir.mkdir(parents=True, exist_ok=True)
            with tpm._txn(load=False):
                if not (state_dir / STATE_FILE).exists():  # re-check under the lock
                    tpm._create(host or state_dir.resolve().name or "host")
                    startup = "created"
        # A TPM Reset discards the volatile state, so it is not even read (this is also
        # how an operator recovers from a damaged volatile.bin: reset the TPM).
        with tpm._txn(volatile=startup != "clear"):
            if startup == "clear":
                tpm._startup_clear()
            elif startup == "state":
                tpm._startup_state()
            if issuer is not None:
                tpm._certify(issuer, host)
        return tpm

    def _create(self, host: str) -> None:
        self._persist = PersistentState(
            ak_private=keys.private_to_bytes(keys.generate_private_key()),
            storage_key=os.urandom(32),
            proof=os.urandom(32),
            clock=0,
            reset_count=0,
            restart_count=0,
            nv_generation=0,
            host=_label(host),
            ak_certificate=b"",
        )
        self._ak = keys.private_from_bytes(self._persist.ak_private)
        self._counters = NvCounters()
        self._log = EventLog()
        # Counters first, then volatile, then the main file: the main file's existence
        # marks a complete TPM.
        self._write_counters()
        self._write_volatile()
        self._write_persistent()

    def _startup_clear(self) -> None:
        self._persist = replace(
            self._persist, reset_count=self._persist.reset_count + 1, restart_count=0
        )
        self._log = EventLog()
        self._write_volatile()
        self._write_persistent()

    def _startup_state(self) -> None:
        self._persist = replace(self._persist, restart_count=self._persist.restart_count + 1)
        self._write_persistent()

    def resume(self) -> None:
        """TPM Resume in place (hibernate and wake): PCRs kept, restartCount + 1."""
        with self._txn():
            self._startup_state()

    def reset(self) -> None:
        """Power-cycle the TPM in place (TPM Reset): PCRs and event log cleared."""
        with self._txn(volatile=False):
            self._startup_clear()

    # ------------------------------------------------------- state handling
    @contextlib.contextmanager
    def _txn(self, load: bool = True, volatile: bool = True):
        """Lock the directory, reload the state from disk, run, release."""
        with self._mutex:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with statefile.locked(self.state_dir):
                self._depth = 1
                try:
                    if load:
                        self._load(volatile)
                    yield
                except BaseException:
                    # A command that failed half-way (a write that did not happen, a
                    # corrupt file) may leave memory ahead of or apart from the
                    # files: the next command reads every file again.
                    self._seen.clear()
                    raise
                finally:
                    self._depth = 0

    def _mac_key(self, label: bytes) -> bytes:
        proof = self._persist.proof
        key = self._mac_keys.get((proof, label))
        if key is None:         # (derived once per proof: every command checks two files' MACs)
            key = self._mac_keys[proof, label] = _derive(proof, label)
        return key

    def _identity(self, name: str) -> tuple | None:
        try:
            st = os.stat(os.path.join(self._dir, name))
        except OSError:
            return None         # missing or unreadable: statefile.read says which
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _changed_payload(self, name: str, magic: int, version: int, max_payload: int,
                         mac_key: bytes | None = None) -> bytes | None:
        """The file's checked payload, or None if its identity is what this handle
        last read or wrote (its content is in memory).  The identity is taken
        before the read (a write racing it shows next time) and kept at once:
        if parsing what was read fails, the command fails and _txn forgets it."""
        ident = self._identity(name)
        if ident is not None and self._seen.get(name) == ident:
            return None
        payload = statefile.read(self.state_dir / name, magic, version, max_payload, mac_key)
        self._seen[name] = ident
        return payload

    def _note_written(self, name: str) -> None:
        ident = self._identity(name)
        if ident is None:
            self._seen.pop(name, None)
        else:
            self._seen[name] = ident

    def _load(self, volatile: bool = True) -> None:
        path = self.state_dir / STATE_FILE
        if self._persist is None and not path.exists():
            raise NoTpmStateError(f"no TPM state in {self.state_dir}")
        payload = self._changed_payload(STATE_FILE, STATE_MAGIC, STATE_VERSION, MAX_STATE_PAYLOAD)
        if payload is not None:
            try:
                persist = PersistentState.from_bytes(payload)
            except FormatError as e:
                raise CorruptStateError(path, str(e)) from None
            self._persist = persist
            self._ak = keys.private_from_bytes(persist.ak_private)
        persist = self._persist
        # The TPM clock only moves forward: never behind what is on disk -- unless
        # what is on disk is this instance's own reservation ahead of its clock.
        if persist.clock > self._now_clock() and persist.clock != self._reserved:
            self._clock_base, self._t0 = persist.clock, time.monotonic()

        cpath = self.state_dir / COUNTERS_FILE
        cpayload = self._changed_payload(
            COUNTERS_FILE, COUNTERS_MAGIC, STATE_VERSION, MAX_COUNTERS_PAYLOAD, self._mac_key(b"nv-counters")
        )
        counters = self._counters
        if cpayload is not None:
            try:
                counters = NvCounters.from_bytes(cpayload)
            except FormatError as e:
                raise CorruptStateError(cpath, str(e)) from None
        if counters.generation < persist.nv_generation:
            raise CounterError(
                f"{cpath}: NV counters rolled back (generation {counters.generation} < "
                f"{persist.nv_generation} recorded in {STATE_FILE})"
            )
        if counters.generation > persist.nv_generation + 1:
            raise CounterError(
                f"{cpath}: NV counters generation {counters.generation} does not follow "
                f"{persist.nv_generation} recorded in {STATE_FILE}"
            )
        self._counters = counters

        if volatile:
            self._load_volatile()
        if counters.generation == persist.nv_generation + 1:
            # An increment was interrupted after the counters were written: finish it.
            self._write_persistent()

    def _load_volatile(self) -> None:
        persist = self._persist
        vpath = self.state_dir / VOLATILE_FILE
        vpayload = self._changed_payload(
            VOLATILE_FILE, VOLATILE_MAGIC, VOLATILE_VERSION, MAX_EVENTLOG_BYTES + 8, self._mac_key(b"volatile")
        )
        if vpayload is None:
            return
        try:
            volatile = VolatileState.from_bytes(vpayload)
        except FormatError as e:
            raise CorruptStateError(vpath, str(e)) from None
        if volatile.reset_count != persist.reset_count:
            raise CorruptStateError(vpath, "belongs to another boot (resetCount differs)")
        self._log = volatile.event_log

    def _now_clock(self) -> int:
        return self._clock_base + int((time.monotonic() - self._t0) * 1000)

    def _write_persistent(self) -> None:
        self._persist = replace(
            self._persist,
            clock=max(self._persist.clock, self._now_clock()),
            nv_generation=self._counters.generation,
        )
        statefile.write(self.state_dir / STATE_FILE, STATE_MAGIC, STATE_VERSION, self._persist.to_bytes())
        self._note_written(STATE_FILE)

    def _write_volatile(self) -> None:
        statefile.write(
            self.state_dir / VOLATILE_FILE,
            VOLATILE_MAGIC,
            VOLATILE_VERSION,
            VolatileState(self._persist.reset_count, self._log).to_bytes(),
            self._mac_key(b"volatile"),
        )
        self._note_written(VOLATILE_FILE)

    def _write_counters(self) -> None:
        statefile.write(
            self.state_dir / COUNTERS_FILE,
            COUNTERS_MAGIC,
            STATE_VERSION,
            self._counters.to_bytes(),
            self._mac_key(b"nv-counters"),
        )
        self._note_written(COUNTERS_FILE)

    # ------------------------------------------------------------ identity
    # The key hierarchy a quote's qualifiedSigner names (TPM 2.0 Part 1, clause 16):
    #   endorsement hierarchy (TPM_RH_ENDORSEMENT) -> EK (primary) -> AK
    # which is what tpm2_createek + tpm2_createak build on a real TPM.  The EK is a
    # primary key, so like a real one it is derived from a secret seed (here the proof
    # secret) and needs no state of its own.
    def _ek_key(self) -> ec.EllipticCurvePrivateKey:
        return keys.derive_private_key(self._persist.proof, b"endorsement primary key (EK)")

    def _ek_qualified_name(self) -> bytes:
        # A function of the proof secret alone; deriving the EK costs a scalar
        # multiplication, so it is done once per proof (each quote names it).
        proof = self._persist.proof
        if self._ek_qn is None or self._ek_qn[0] != proof:
            ek_name = keys.name_of(keys.ek_public_area(self._ek_key().public_key()))
            self._ek_qn = (proof, keys.qualified_name(keys.hierarchy_qualified_name(keys.TPM_RH_ENDORSEMENT),
                                                      ek_name))
        return self._ek_qn[1]

    def _ak_qualified_name(self) -> bytes:
        ak_name = keys.name_of(keys.public_area(self._ak.public_key()))
        return keys.qualified_name(self._ek_qualified_name(), ak_name)

    @property
    def ak_public(self) -> bytes:
        """TPMT_PUBLIC of the attestation key."""
        with self._txn():
            return keys.public_area(self._ak.public_key())

    @property
    def ak_name(self) -> bytes:
        return keys.name_of(self.ak_public)

    @property
    def ek_public(self) -> bytes:
        """TPMT_PUBLIC of the endorsement key, the AK's parent."""
        with self._txn():
            return keys.ek_public_area(self._ek_key().public_key())

    @property
    def ak_parent_qualified_name(self) -> bytes:
        """Qualified Name of the AK's parent (the EK): what its certificate records."""
        with self._txn():
            return self._ek_qualified_name()

    @property
    def ak_qualified_name(self) -> bytes:
        """The AK's Qualified Name: what a quote carries as qualifiedSigner."""
        with self._txn():
            return self._ak_qualified_name()

    @property
    def host(self) -> str:
        with self._txn():
            return self._persist.host

    @property
    def certified(self) -> bool:
        """Whether the AK has a certificate (without parsing it)."""
        with self._txn():
            return bool(self._persist.ak_certificate)

    @property
    def ak_certificate(self) -> AkCertificate | None:
        with self._txn():
            cert = self._persist.ak_certificate
            return AkCertificate.from_bytes(cert) if cert else None

    def certify(self, issuer: Issuer, host: str | None = None) -> AkCertificate:
        """Have ``issuer`` certify this TPM's AK (kept in the state directory)."""
        with self._txn():
            return self._certify(issuer, host)

    def _certify(self, issuer: Issuer, host: str | None) -> AkCertificate:
        ak_public = keys.public_area(self._ak.public_key())
        subject = _label(host) if host else self._persist.host
        current = self._persist.ak_certificate
        if current:
            cert = AkCertificate.from_bytes(current)
            if (
                cert.issuer_key_id == issuer.key_id
                and cert.ak_public == ak_public
                and cert.subject == subject
                and cert.version == CERT_VERSION
                and cert.parent_qualified_name == self._ek_qualified_name()
            ):
                return cert
        cert = issuer.certify(ak_public, subject, parent_qualified_name=self._ek_qualified_name())
        self._persist = replace(self._persist, ak_certificate=cert.to_bytes(), host=subject)
        self._write_persistent()
        return cert

    def clock_info(self) -> ClockInfo:
        with self._txn():
            return self._clock_info()

    def _clock_info(self) -> ClockInfo:
        p = self._persist
        clock = self._now_clock()
        if p.clock != self._reserved:           # (a reservation is ahead: report the clock itself)
            clock = max(p.clock, clock)
        return ClockInfo(clock, p.reset_count, p.restart_count, True)

    # ----------------------------------------------------------------- PCRs
    def _bank(self) -> PcrBank:
        # The log only ever grows in place (extend) or is replaced (load, startup):
        # the object (held here, so its id is never reused) and its length name its
        # content.  Callers only read the bank.
        log, n = self._log, len(self._log)
        if self._replayed is None or self._replayed[0] is not log or self._replayed[1] != n:
            self._replayed = (log, n, log.replay())
        return self._replayed[2]

    def read_pcr(self, index: int) -> bytes:
        check_index(index)
        with self._txn():
            return self._bank().read(index)

    def pcrs(self) -> tuple[bytes, ...]:
        """All 24 PCR values, index order."""
        with self._txn():
            return self._bank().values()

    def pcr_digest(self, selection: PcrSelection | list[int]) -> bytes:
        selection = _selection(selection)
        with self._txn():
            return self._bank().digest(selection)

    def event_log(self) -> EventLog:
        with self._txn():
            return EventLog(list(self._log))

    def extend(
        self,
        pcr: int,
        digest: bytes,
        *,
        event_type: EventType = EventType.MANUAL,
        data: bytes = b"",
    ) -> bytes:
        """Extend PCR ``pcr`` by ``digest`` and log the event; return the new PCR value.

        This is the only way to change a PCR.
        """
        event = Event(pcr, EventType(event_type), bytes(digest), bytes(data))
        with self._txn():
            try:
                self._log.append(event)
            except ValueError as e:
                raise TpmError(str(e)) from None
            self._write_volatile()
            return self._bank().read(pcr)

    def measure(self, pcr: int, data: bytes, event_type: EventType) -> bytes:
        """Extend PCR ``pcr`` by SHA-256(data), logging ``data`` as the event data."""
        return self.extend(pcr, hashlib.sha256(data).digest(), event_type=event_type, data=data)

    # --------------------------------------------------------------- quote
    def quote(self, nonce: bytes, pcrs: PcrSelection | list[int] = DEFAULT_PCRS) -> Evidence:
        """TPM2_Quote with the AK over ``pcrs``, with ``nonce`` as extraData.

        Returns the evidence bundle (quote, signature, event log, AK certificate);
        ``.to_bytes()`` it to send it to a verifier.
        """
        return Evidence.from_bytes(self.quote_bytes(nonce, pcrs))

    def quote_bytes(self, nonce: bytes, pcrs: PcrSelection | list[int] = DEFAULT_PCRS) -> bytes:
        """``quote()`` as the bytes a verifier is sent, without parsing them back:
        what a VMM's handshake needs (the parse, the AK certificate's round trip
        and the re-encoding were half of a quote's cost, measured)."""
        nonce = bytes(nonce)
        if len(nonce) > MAX_EXTRA_DATA:
            raise ValueError(f"nonce (qualifying data) is at most {MAX_EXTRA_DATA} bytes")
        selection = _selection(pcrs)
        with self._txn():
            now = self._now_clock()
            # Reserve ahead: the next quotes write nothing.  (>=: a quote in the same
            # millisecond as the persisted value reserves too, so whether an
            # instance's first quote writes does not depend on the host's speed.)
            if now >= self._persist.clock:
                self._persist = replace(self._persist, clock=now + CLOCK_RESERVE_MS)
                self._write_persistent()
                self._reserved = self._persist.clock
            attest = Attest(
                qualified_signer=self._ak_qualified_name(),
                extra_data=nonce,
                clock_info=self._clock_info(),
                firmware_version=FIRMWARE_VERSION,
                selection=selection,
                pcr_digest=self._bank().digest(selection),
            ).to_bytes()
            # The TPM signs its own TPMS_ATTEST; no magic check here (this is the one
            # path that is allowed to produce data starting with TPM_GENERATED_VALUE).
            signature = keys.sign(self._ak, attest)
            # (The certificate as certify() stored it, to_bytes() of a parsed one: b"" if none.)
            return Evidence.encode(attest, signature, self._persist.ak_certificate, self._log.to_bytes())

    def sign(self, data: bytes) -> bytes:
        """TPM2_Sign with the restricted AK over external data (TPMT_SIGNATURE).

        A restricted signing key must never sign something a verifier could take for a
        TPM-generated structure, so data beginning with TPM_GENERATED_VALUE is refused
        (a real TPM refuses a digest without a hash-check ticket proving this).
        """
        data = bytes(data)
        if data[:4] == TPM_GENERATED_BYTES:
            raise RestrictedKeyError(
                "restricted attestation key refuses to sign data beginning with "
                "TPM_GENERATED_VALUE (0xFF544347)"
            )
        with self._txn():
            return keys.sign(self._ak, data)

    # -------------------------------------------------------- seal/unseal
    def seal(
        self,
        data: bytes,
        pcrs: PcrSelection | list[int] | None = DEFAULT_PCRS,
        pcr_digest: bytes | None = None,
    ) -> bytes:
        """Seal ``data`` to the current values of ``pcrs`` (or to ``pcr_digest``);
        ``pcrs=None``: no PCR policy, only this TPM can unseal it."""
        selection = None if pcrs is None else _selection(pcrs)
        with self._txn():
            digest = None if selection is None else (
                self._bank().digest(selection) if pcr_digest is None else pcr_digest)
            return _seal.seal(self._persist.storage_key, data, selection, digest)

    def unseal(self, blob: bytes) -> bytes:
        """Return sealed data if the selected PCRs still have their sealed values.

        Raises UnsealError otherwise (changed PCRs, tampered or foreign blob).
        """
        with self._txn():
            bank = self._bank()
            return _seal.unseal(self._persist.storage_key, bytes(blob), bank.digest)

    # -------------------------------------------------------- NV counters
    def counter_increment(self, name: str) -> int:
        """Increment NV counter ``name`` (defining it at 0 first); return the new value."""
        with self._txn():
            value = self._counters.increment(name)
            self._write_counters()  # counters first: see _load's generation check
            self._write_persistent()
            return value

    def counter_read(self, name: str) -> int:
        """Current value of NV counter ``name`` (0 if never incremented)."""
        with self._txn():
            return self._counters.read(name)

    def counters(self) -> list[tuple[str, int]]:
        with self._txn():
            return self._counters.items()


def _label(text: str) -> str:
    """Clip a host label to the 64-byte bound of certificates (on a UTF-8 boundary)."""
    return text.encode("utf-8")[:MAX_LABEL].decode("utf-8", errors="ignore")


def _selection(pcrs: PcrSelection | list[int]) -> PcrSelection:
    return pcrs if isinstance(pcrs, PcrSelection) else PcrSelection(pcrs)
