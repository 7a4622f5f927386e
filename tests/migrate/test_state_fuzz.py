"""A hostile state document with a recomputed digest, against a real
``minivmm serve --forever`` process (issue 10, item 2).

The plain-mode source is not authenticated: whatever it puts in the state
document, its digest can match.  Each example takes a real machine's
document (a protected process and a counter, so the protection section is
full), makes one type, range or structure mutation at one place, recomputes
the digest, and sends the whole stream.  The destination either rejects it
with a clean error naming the document, or resumes a guest it can run (for
harmless mutations: a console byte, a symbol's value); the serving process
survives every example and then serves a good migration.
"""

import copy
import json
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guests.build import Program, build_image
from migrate.digest import StreamDigest
from migrate.errors import MigrationError, ProtocolError
from migrate.messages import STATUS_BUSY, Digest, Hello, RoundMark, Welcome, decode_reason, encode_pages, \
    encode_zero_pages
from migrate.source import Source
from migrate.statecheck import parse_state
from migrate.wire import MAX_BATCH, Channel, RecordType
from minivmm.machine import Machine

from vmmproc import serve

# ~10 s with 120 examples: in the default run (not marked slow).

IMAGE = build_image([Program.builtin("keeper", data_pages=3, args=(400, 1)),
                     Program.builtin("counter", args=(400, 100_000))], name="fuzzed")


def _source():
    m = Machine(IMAGE)
    m.run(until=lambda mm: "secret intact" in mm.console.text(1))
    m.seal_for_export()
    assert m.halted is None and m.protection.procs[1].pages
    return m


SOURCE = _source()
DOC = SOURCE.save_state(ram=False).to_doc()
RAM = np.frombuffer(bytes(SOURCE.ram.view), dtype=np.uint8).reshape(-1, 4096)


def _pages_records():
    npages = len(RAM)
    nz = RAM.view(np.uint64).any(axis=1)
    recs = [(RecordType.ROUND_BEGIN, RoundMark(0, npages).encode())]
    data = np.flatnonzero(nz)
    for i in range(0, len(data), MAX_BATCH):
        sel = data[i:i + MAX_BATCH]
        recs.append((RecordType.PAGES, b"".join(bytes(memoryview(p).cast("B")) for p in encode_pages(sel, RAM[sel]))))
    recs.append((RecordType.ZERO_PAGES, encode_zero_pages(np.flatnonzero(~nz))))
    recs.append((RecordType.ROUND_END, RoundMark(0, npages).encode()))
    hashes = StreamDigest(npages)       # folded in stream order: the PAGES records, then ZERO_PAGES
    for i in range(0, len(data), MAX_BATCH):
        hashes.update(data[i:i + MAX_BATCH], RAM[data[i:i + MAX_BATCH]])
    hashes.update_zero(np.flatnonzero(~nz))
    return recs, hashes


PAGES, HASHES = _pages_records()


def stream(doc: bytes):
    recs = [(RecordType.HELLO, Hello(SOURCE.ram.size, {"vm": "fuzzed"}).encode())] + PAGES
    recs += [(RecordType.STATE, doc[i:i + (1 << 20)]) for i in range(0, len(doc), 1 << 20)]
    return recs + [(RecordType.DIGEST, Digest(len(doc), HASHES.final(doc)).encode()), (RecordType.COMMIT, b"")]


def send(port: int, doc: bytes) -> str:
    """One migration of ``doc``: 'resumed', 'busy' or 'aborted: <reason>'."""
    ch = Channel(socket.create_connection(("127.0.0.1", port)), timeout=20)

    def writer():
        try:
            for t, b in stream(doc):
                ch.send(t, b)
        except MigrationError:
            pass
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        while True:
            rec = ch.recv()
            if rec.type is RecordType.WELCOME and Welcome.decode(rec.body).status == STATUS_BUSY:
                return "busy"
            if rec.type is RecordType.RESUMED:
                return "resumed"
            if rec.type is RecordType.ABORT:
                return "aborted: " + decode_reason(rec.body)
    except MigrationError as exc:
        return f"aborted: connection: {exc}"
    finally:
        ch.close()
        w.join(20)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:2]):
            yield from paths(v, prefix + (i,))


PATHS = [p for p in paths(DOC) if p]
ODD = ["x", "100000", 1.5, True, False, None, [], {}, -1, 2 ** 64, 10 ** 30, 2 ** 31, 0]


def mutate(doc, path, how, pick):
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    value = parent[key]
    if how == "type":
        parent[key] = ODD[pick % len(ODD)]
    elif how == "delete":
        del parent[key]
    elif how == "extra":
        if isinstance(value, dict):
            value["zz_unknown"] = 1
        elif isinstance(value, list):
            value.append(value[0] if value else 1)
        else:
            parent[key] = [value]
    else:                                   # range: stay the right type, go out of range
        if isinstance(value, bool):
            parent[key] = not value
        elif isinstance(value, int):
            parent[key] = [value + 1, value - 1, -value - 1, value << 32, value * 7 + 3][pick % 5]
        elif isinstance(value, str):
            parent[key] = ["", value[:-1], value + "A", "A" * 5000, value.upper()][pick % 5]
        elif isinstance(value, list):
            parent[key] = value * (2 + pick % 3)
        else:
            parent[key] = None
    return doc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dst, port = serve(tmp_path_factory.mktemp("statefuzz"), "--forever", "--ticks", "2", "--timeout", "10")
    yield dst, port
    dst.kill()


def migrate_when_free(port, doc, dst):
    deadline = time.monotonic() + 60
    while True:
        assert dst.proc.poll() is None, "the serving VMM died:\n" + dst.stderr[-3000:]
        out = send(port, doc)
        if out != "busy":
            return out
        assert time.monotonic() < deadline, "the serving VMM stays busy"
        time.sleep(0.05)


def test_the_unmutated_document_migrates(server):
    dst, port = server
    assert migrate_when_free(port, json.dumps(DOC).encode(), dst) == "resumed"


@settings(derandomize=True, max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PATHS), st.sampled_from(["type", "delete", "extra", "range"]), st.integers(0, 99))
def test_a_mutated_state_document_never_kills_the_server(server, path, how, pick):
    dst, port = server
    doc = mutate(DOC, path, how, pick)
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    out = migrate_when_free(port, data, dst)
    try:
        parse_state(data, SOURCE.ram.size)
        accepted = True
    except ProtocolError:
        accepted = False
    if out != "resumed":
        assert "state document" in out, (path, how, out)
        # refused by the strict validator, never by a crash it let through
        for crash in ("TypeError", "KeyError", "AttributeError", "internal error", "OverflowError"):
            assert crash not in out, (path, how, out)
    else:
        assert accepted, (path, how)
    assert dst.proc.poll() is None, "the serving VMM died:\n" + dst.stderr[-3000:]


def test_after_the_fuzz_a_real_source_still_migrates(server):
    dst, port = server
    m = Machine(IMAGE)
    m.run(max_ticks=5)
    deadline = time.monotonic() + 60
    while True:
        try:
            report = Source(m, timeout=10).migrate(f"127.0.0.1:{port}")
            break
        except MigrationError as exc:
            assert "busy" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(0.1)
    assert report.outcome == "completed" and dst.proc.poll() is None
