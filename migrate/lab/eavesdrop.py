"""The eavesdropper's analysis: what a captured migration stream gives away.

In plain mode the state document crosses in clear, and it holds every
protected process's page key (``protection.keys``) and the nonce, tag,
version and frame of each cloaked page.  With the pages from the same stream
an attacker opens every cloaked page exactly as the destination VMM would
(``minivmm.cloak``: AES-256-GCM, associated data from ident/vpn/version).

Under the secure protocol nothing after the handshake is readable, and even
with ``--insecure encryption`` the keys travel only in KEY_RELEASE, wrapped
for the attested destination's TPM-sealed release key: the analysis says
what it could and could not read.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from minivmm.cloak import PageCipher, associated_data
from migrate.lab.records import body_of, pages_of, state_document
from migrate.wire import HEADER, PAGE_SIZE, RecordType

PRINTABLE = re.compile(rb"[\x20-\x7e]{12,}")


@dataclass
class Findings:
    records: int = 0
    readable_pages: int = 0
    state_readable: bool = False
    keys: int = 0
    opened: list[tuple[str, int]] = field(default_factory=list)       # (process, vaddr)
    secrets: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"eavesdrop: {self.records} records from the source; {self.readable_pages} page images readable"]
        if not self.state_readable:
            out.append("eavesdrop: the state document is not readable: no process key, no page opened")
            return out
        out.append(f"eavesdrop: state document readable; {self.keys} process key(s) in it")
        for name, vaddr in self.opened:
            out.append(f"eavesdrop: opened protected page {vaddr:#x} of {name}")
        for s in self.secrets:
            out.append(f"eavesdrop: LEAKED: {s!r}")
        if self.keys and not self.opened:
            out.append("eavesdrop: keys found but no cloaked page opened")
        return out


def analyse(s2d: list[bytes]) -> Findings:
    """``s2d``: the raw records the destination received, in order."""
    f = Findings(records=len(s2d))
    ram: dict[int, bytes] = {}
    chunks = []
    for raw in s2d:
        if len(raw) < HEADER.size:
            continue
        t = HEADER.unpack_from(raw)[0]
        body = body_of(raw)
        if t == RecordType.PAGES:
            pairs = pages_of(body)
            for pfn, data in pairs or ():
                ram[pfn] = data
            f.readable_pages += len(pairs or ())
        elif t == RecordType.ZERO_PAGES and len(body) >= 4:
            n = int.from_bytes(body[:4], "little")
            if len(body) == 4 + 4 * n:
                for i in range(n):
                    ram[int.from_bytes(body[4 + 4 * i: 8 + 4 * i], "little")] = bytes(PAGE_SIZE)
        elif t == RecordType.STATE:
            chunks.append(bytes(body))
    doc = state_document(chunks) if chunks else None
    if doc is None:
        return f
    f.state_readable = True
    prot = doc.get("protection")
    if not isinstance(prot, dict):
        return f
    try:
        keys = {int(h): base64.b64decode(k) for h, k in prot.get("keys", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return f
    f.keys = len(keys)
    for proc in prot.get("processes", ()):
        try:
            cipher = PageCipher(keys[int(proc["key_handle"])])
            for vpn, ppn, state, version, nonce, tag in proc["pages"]:
                if state != "cloaked" or ppn not in ram:
                    continue
                try:
                    plain = cipher.open(ram[ppn], bytes.fromhex(tag), bytes.fromhex(nonce),
                                        associated_data(int(proc["ident"]), vpn, version))
                except InvalidTag:
                    continue
                f.opened.append((f"pid {proc['pid']} ({proc['name']})", vpn * PAGE_SIZE))
                for m in PRINTABLE.finditer(plain):
                    text = m.group().decode()
                    if text not in f.secrets:
                        f.secrets.append(text)
        except (KeyError, ValueError, TypeError):
            continue
    return f
