"""A secure handshake refused before the key exchange, said as it is.

Before any key share crosses, a secure destination can still refuse: a source
that speaks plain mode, or a destination that will not take this VM. The
refusal is an ABORT in clear (no keys exist yet) carrying the reason; each end
must name it, not report a garbled protocol."""

from __future__ import annotations

from migrate.errors import MigrationError, ProtocolError
from migrate.secure.errors import SecurityError
from migrate.secure.mode import PlainMode, SecureMode
from migrate.wire import RecordType

from securehelp import Trust
from test_secure_attacks import guest
from test_secure_pipeline_attacks import migrate, refused_at_home


def against(tmp_path, destination):
    """Migrate the protected guest from an honest secure source to a
    ``destination(attestor)`` through a recording relay: (keys before, guest, results)."""
    trust = Trust(tmp_path)
    a, b = trust.host("a"), trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    attestor_b = trust.mode(b).attestor
    m, res = migrate(trust.mode(a), lambda: destination(attestor_b), m=m)
    return keys, m, res


class RefusesThisVm(SecureMode):
    """A destination that refuses the VM as soon as HELLO arrives."""
    def destination_handshake(self, ch, hello, hello_body):
        raise SecurityError("this destination takes no VM today (injected refusal)")


def test_a_destination_that_refuses_before_its_key_share_is_named_by_the_source(tmp_path):
    keys, m, res = against(tmp_path, RefusesThisVm)
    err = res["source_error"]
    # The destination's reason, as a refusal of the handshake -- not "expected
    # KEY_SHARE, destination sent ABORT", which blames the protocol.
    assert isinstance(err, SecurityError) and not isinstance(err, ProtocolError), repr(err)
    assert "destination aborted the handshake" in str(err) and "injected refusal" in str(err), str(err)
    refused_at_home(m, keys, res, MigrationError, "takes no VM today")
    sent = [t for t, _ in res["relay"].seen]
    assert RecordType.KEY_SHARE in sent and RecordType.QUOTE not in sent, sent


def test_a_plain_source_is_refused_by_a_secure_destination_by_name(tmp_path):
    """A downgrade: the source announces plain mode. The destination refuses
    it for what it is before reading anything else of its HELLO."""
    trust = Trust(tmp_path)
    b = trust.host("b", role="destination")
    m = guest()
    keys = dict(m.protection._keys)
    attestor_b = trust.mode(b).attestor
    m, res = migrate(PlainMode(), lambda: SecureMode(attestor_b), m=m)
    assert isinstance(res["error"], SecurityError), repr(res["error"])
    assert "the source speaks plain mode" in str(res["error"]), str(res["error"])
    assert "speaks plain mode" in str(res["source_error"]), str(res["source_error"])
    assert "report" not in res and "incoming" not in res
    assert m.protection._keys == keys and not m.halted


class CannotQuote(SecureMode):
    """A destination whose TPM cannot quote: it has sent its key share, and
    aborts instead of sending its QUOTE."""
    def __init__(self, attestor, **kw):
        import copy
        attestor = copy.copy(attestor)

        def quote(nonce, binding):
            raise SecurityError("this destination's TPM cannot quote (injected)")
        attestor.quote = quote
        super().__init__(attestor, **kw)


def test_a_destination_that_aborts_instead_of_quoting_is_named_by_the_source(tmp_path):
    keys, m, res = against(tmp_path, CannotQuote)
    err = res["source_error"]
    # Named as the destination's abort -- not taken for a malformed quote.
    assert type(err) is SecurityError, repr(err)
    assert "destination aborted the handshake" in str(err) and "cannot quote (injected)" in str(err), str(err)
    refused_at_home(m, keys, res, SecurityError, "cannot quote")
    sent = [t for t, _ in res["relay"].seen]
    assert sent.count(RecordType.QUOTE) == 0, sent      # neither end's quote crossed
