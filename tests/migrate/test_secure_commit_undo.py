"""A secure COMMIT that does not take: the source gets its process keys back and
undoes its migrated-away mark, so its guest -- the only copy -- runs on with its
protected process whole (DESIGN §6.7).  Two ways, each deterministic:

* the COMMIT record cannot be sent (the connection drops under it): no whole
  COMMIT reached the destination, which cannot resume;
* the destination gave up waiting for COMMIT and said so in a sealed ABORT
  before the source's COMMIT reached it (Intel TDX's abort token).

Issue 19: the seeded-bug run removed each of the source's ``undo_commit``
calls on these two paths and every test passed: both were redundant with the
one in ``Source._abort``, which both paths reach (they were removed).  These
tests fail if that one is removed -- plain-mode tests cannot see it (plain mode
destroys no keys): the guest comes back without its protected process's keys."""

import threading

from migrate.errors import ConnectionLost, PeerAborted, PeerTimeout
from migrate.secure.channel import SealedChannel
from migrate.secure.commit import read_mark
from migrate.server import Server
from migrate.source import Source
from migrate.wire import RecordType

from inproc import BOUNDED
from securehelp import Trust, secure_receive_in_thread
from test_secure_attacks import assert_home_intact, guest


def run(tmp_path, source_channel, destination_channel):
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    assert keys, "the keeper is protected"
    server, res = Server("127.0.0.1:0", timeout=5, channel=destination_channel), {}
    t = secure_receive_in_thread(server, res, lambda: trust.mode(b), timeout=5)
    mode = trust.mode(a)
    try:
        Source(m, mode=mode, timeout=5, policy=BOUNDED, channel=source_channel).migrate(server.label)
    except Exception as exc:      # noqa: BLE001 - the test asserts which
        res["source_error"] = exc
    t.join(60)
    server.close()
    return m, keys, res, read_mark(a, mode.vm[0])


def plain_destination(sock, timeout):
    return SealedChannel(sock, timeout=timeout, role="destination")


def test_a_secure_commit_that_could_not_be_sent_gives_the_keys_back(tmp_path):
    class CommitFails(SealedChannel):
        def send(self, rtype, *parts):
            if rtype is RecordType.COMMIT:
                self.close()
                raise ConnectionLost("the connection dropped under COMMIT")
            return super().send(rtype, *parts)

    m, keys, res, mark = run(tmp_path, lambda s, timeout: CommitFails(s, timeout=timeout, role="source"),
                             plain_destination)
    err = res["source_error"]
    assert isinstance(err, ConnectionLost) and "dropped under COMMIT" in str(err), err
    assert err.report.outcome == "aborted"
    assert isinstance(res["error"], ConnectionLost)         # the destination discarded the VM
    assert mark is None, "the migrated-away mark is undone"
    assert_home_intact(m, keys, res)


def test_a_secure_commit_the_destination_gave_up_on_gives_the_keys_back(tmp_path):
    at_commit, gave_up = threading.Event(), threading.Event()

    class LateCommit(SealedChannel):
        """The source, stalled at COMMIT until the destination has given up."""
        def send(self, rtype, *parts):
            if rtype is RecordType.COMMIT:
                at_commit.set()
                assert gave_up.wait(60), "the destination never gave up"
            return super().send(rtype, *parts)

    class GivesUp(SealedChannel):
        """The destination: once PREPARED is out and the source is at COMMIT, its
        wait for COMMIT times out; its ABORT goes out sealed, as always."""
        prepared = False

        def send(self, rtype, *parts):
            super().send(rtype, *parts)
            self.prepared |= rtype is RecordType.PREPARED
            if rtype is RecordType.ABORT:
                gave_up.set()

        def recv(self, *args, **kw):
            if self.prepared:
                assert at_commit.wait(60), "the source never reached COMMIT"
                self.timeout = 0.05
            return super().recv(*args, **kw)

    try:
        m, keys, res, mark = run(tmp_path, lambda s, timeout: LateCommit(s, timeout=timeout, role="source"),
                                 lambda s, timeout: GivesUp(s, timeout=timeout, role="destination"))
    finally:
        at_commit.set()
        gave_up.set()
    err = res["source_error"]
    assert isinstance(err, PeerAborted) and "the guest resumes here" in str(err), err
    assert isinstance(res["error"], PeerTimeout)
    assert mark is None, "the migrated-away mark is undone"
    assert_home_intact(m, keys, res)
