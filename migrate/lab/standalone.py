"""The two network attacks that do not relay a live source:

* ``replay-stream``: connect to a destination and play back the source's half
  of a captured earlier migration of the same VM (a capture file).  The plain
  destination resumes the old copy; the secure one refuses it (the handshake
  is bound to its fresh nonce and key share, and the VM's generation is spent).
* ``impersonate``: answer the source as if we were the destination, with this
  very VMM build (so its measurements are approved) but a TPM whose AK was
  certified by our own issuer.  In plain mode we receive the whole VM, keys
  included; the secure source refuses our attestation.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from pathlib import Path

from migrate.errors import MigrationError
from migrate.lab import capture as cap
from migrate.lab.records import describe, make, read_record
from migrate.wire import Channel, RecordType


def replay_stream(entries: list[cap.Entry], dest: tuple[str, int], *, log=print,
                  timeout: float = 30.0) -> list[str]:
    """Send the captured source -> destination records to ``dest``; what came back."""
    sock = socket.create_connection(dest, timeout=timeout)
    back: list[bytes] = []

    def reader():
        try:
            while True:
                raw = read_record(sock)
                if raw is None:
                    return
                back.append(raw)
                log(f"dst->replayer {describe(raw)}")
        except (OSError, ValueError):
            return
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    try:
        for e in entries:
            if e.direction == cap.TO_DEST and e.action != cap.DROPPED:
                sock.sendall(e.raw)
                sent += 1
                log(f"replayer->dst {describe(e.raw)}  [REPLAYED]")
    except OSError as exc:
        log(f"the destination closed the connection after {sent} records ({exc})")
    t.join(timeout)
    sock.close()
    types = [RecordType(raw[0] | raw[1] << 8).name for raw in back
             if (raw[0] | raw[1] << 8) in RecordType._value2member_map_]
    out = [f"replayed {sent} captured records; the destination answered {len(back)}: "
           + (", ".join(types) or "nothing")]
    if "RESUMED" in types:
        out.append("the destination RESUMED the replayed (old) copy of the VM")
    else:
        out.append("the destination did not resume the replayed stream")
    return out


class _Recording(Channel):
    """A channel that keeps what it received, as the raw records."""
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.received: list[bytes] = []

    def recv(self, **kw):
        kw.pop("sink", None)        # whole records (pages in the body), to replay them later
        rec = super().recv(**kw)
        self.received.append(make(rec.type, bytes(rec.body), rec.seq))
        return rec


def impersonate(listener: socket.socket, *, secure: bool, log=print, timeout: float = 10.0) -> list[str]:
    """Take one source's connection on ``listener`` and be its destination."""
    from migrate.destination import Destination
    from migrate.lab.eavesdrop import analyse
    conn, peer = listener.accept()
    peer = f"{peer[0]}:{peer[1]}"
    out = []
    with tempfile.TemporaryDirectory(prefix="minivmm-impostor-") as tmp:
        if secure:
            from migrate.secure.channel import SealedChannel
            ch = SealedChannel(conn, timeout=timeout, role="destination")
            mode = _impostor_mode(Path(tmp))
            out.append("answering as a secure destination: this build (approved measurements), "
                       "TPM AK certified by the impostor's own issuer")
        else:
            from migrate.secure.mode import PlainMode
            ch = _Recording(conn, timeout=timeout)
            mode = PlainMode()
            out.append("answering as a plain destination")
        try:
            incoming = Destination(timeout=timeout, mode=mode).receive(ch, peer)
        except MigrationError as exc:
            out.append(f"the source did not hand over the VM: {exc}")
            return out
        finally:
            ch.close()
        m = incoming.machine
        out.append(f"RECEIVED the VM {m.image.name!r} (vclock {m.vclock}); the source "
                   f"believes it migrated and stopped it")
        if isinstance(ch, _Recording):
            out += [line.removeprefix("eavesdrop: ") for line in analyse(ch.received).lines()]
    return out


def _impostor_mode(base: Path):
    """A secure destination on a TPM certified by an issuer nobody trusts."""
    from migrate.measure import measure_start
    from migrate.secure.attest import Attestor
    from migrate.secure.mode import SecureMode
    from migrate.secure.setup import certify, protection_policy, setup
    issuer, policy = setup(base)
    measure_start(base / "tpm", {"role": "destination"}, protection_policy())
    certify(base / "tpm", issuer)
    # It does not care who the source is: it verifies nothing.
    return SecureMode(Attestor(base / "tpm", issuer, policy), insecure=("attestation",))
