"""A man in the middle on loopback for the secure-protocol tests: the lab's
record-aware relay (``migrate.lab.relay.Relay``) between a source and the
destination on ``dest_port``.  It forwards one connection record by record,
records every byte in both directions, and lets a test replace any record by
what it likes (nothing, the record twice, a modified copy, an earlier record):
``meddle(seen, rtype, raw) -> list[bytes]`` source -> destination,
``meddle_back`` the other way."""

from __future__ import annotations

from migrate.lab.relay import Relay


class Mitm(Relay):
    def __init__(self, dest_port: int, meddle=None, meddle_back=None):
        super().__init__(("127.0.0.1", dest_port), meddle=meddle, meddle_back=meddle_back)
