"""Migration errors: one hierarchy, so a caller can tell "the migration failed,
the guest is where it was" (:class:`MigrationError`) from everything else.

Until the destination resumes, every one of these leaves the source running
its guest and the destination discarding what it received.  The only
exception is :class:`CommitUnconfirmed`: the source had already committed
(it can never resume its copy) when the channel failed.
"""

from __future__ import annotations


class MigrationError(Exception):
    """A migration did not complete; nothing was resumed by mistake."""


class ProtocolError(MigrationError):
    """The peer sent something malformed, oversized, out of order or unknown."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the migration protocol."""


class Unsupported(ProtocolError):
    """The peer asks for something this VMM cannot do (say, a RAM size)."""


class DigestMismatch(ProtocolError):
    """The final digest does not match what arrived: the VM did not arrive whole."""


class PeerTimeout(MigrationError):
    """The peer said nothing (or not enough) within the deadline."""


class ConnectionLost(MigrationError):
    """The connection closed or failed."""


class Refused(MigrationError):
    """The destination refused the migration (busy, version, size)."""


class PeerAborted(MigrationError):
    """The peer sent ABORT with a reason."""


class GuestStopped(MigrationError):
    """The guest shut down or crashed on the source during pre-copy."""


class InternalError(MigrationError):
    """A bug in this VMM while migrating (never the peer's fault): the
    migration is abandoned as safely as any other failure, and reported."""


class CommitUnconfirmed(MigrationError):
    """The source committed (its copy is gone for good) but the destination
    never confirmed that it resumed: the VM may be running there or lost.
    This is the one window the commit protocol cannot close (two generals);
    it never produces two running copies."""
