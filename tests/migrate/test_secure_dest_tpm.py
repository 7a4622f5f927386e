"""A destination whose own TPM fails in the handshake.

The destination makes its release key (a TPM seal) and reads the VM's
generation (an NV read) on a worker, beside the source's quote
(``SecureMode._release_and_check``), so that it verifies that quote the moment
it arrives.  A failure of its TPM or disk there must still end the session as
a named refusal: the destination aborts, the source says why and runs its
guest on with its keys, and nothing of the VM crossed."""

from __future__ import annotations

from migrate.errors import MigrationError
from migrate.secure.errors import SecurityError
from migrate.secure.mode import SecureMode
from migrate.wire import RecordType

from test_secure_handshake_refusals import against
from test_secure_pipeline_attacks import refused_at_home


class TpmFailsBesideTheHandshake(SecureMode):
    """The real seal and NV read run; then this host's TPM reports a failure."""
    def _release_and_check(self, vm_id, gen):
        super()._release_and_check(vm_id, gen)
        raise OSError("TPM write failed (injected)")


def test_a_destination_whose_tpm_fails_beside_the_handshake_refuses_by_name(tmp_path):
    keys, m, res = against(tmp_path, TpmFailsBesideTheHandshake)
    words = "this host's TPM could not make the release key or read the VM's generation"
    # The destination names it (a SecurityError, not a raw OSError that ends the server) ...
    assert isinstance(res["error"], SecurityError) and words in str(res["error"]), res["error"]
    assert "TPM write failed (injected)" in str(res["error"])
    # ... and the source hears why, in the destination's sealed ABORT, before any page.
    refused_at_home(m, keys, res, MigrationError, words)
    sent = [t for t, _ in res["relay"].seen]
    assert RecordType.PAGES not in sent and RecordType.ROUND_BEGIN not in sent, sent
