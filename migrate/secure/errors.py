"""Failures of the secure protocol, each naming the obligation that caught it.

All are :class:`MigrationError`: before COMMIT they leave the source running
its guest and the destination discarding what it received (fail closed).
"""

from __future__ import annotations

from minivmm.errors import StateError
from migrate.errors import MigrationError, ProtocolError


class SecurityError(MigrationError):
    """A defence of the secure protocol refused the peer."""


class AttestationFailed(SecurityError):
    """The peer's quote, certificate, event log or measurements were refused."""


class RecordRejected(SecurityError, ProtocolError):
    """A sealed record failed authentication or arrived out of sequence
    (modified, forged, replayed, reordered or dropped)."""


class KeyReleaseRefused(SecurityError):
    """The final-phase proof failed (TOCTOU): no process key was released."""


class StaleGeneration(SecurityError):
    """A migration generation not newer than the last one accepted for the VM."""


class OldCopy(StaleGeneration, StateError):
    """A state of a VM older than the generation with which it left this host
    (``rollback.check_restore``): never resumed or migrated again here.  Also a
    ``StateError``, so ``minivmm run --restore`` reports it as bad input."""


class BadToken(SecurityError):
    """A COMMIT or ABORT whose token does not verify under the commit key."""
