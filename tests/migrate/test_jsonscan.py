"""The bounded JSON parse (migrate/jsonscan.py) at the edges of each limit.

test_statecheck.py refuses documents far past the state's limits; these tests pin each
limit at its edge (the limit itself passes, one more is refused), the depth carried
from one 1 MiB window of the scan to the next, and each deadline check in its place
(a settable clock stands in for ``time.monotonic``; nothing sleeps).
"""

import dataclasses

import pytest

from migrate import jsonscan
from migrate.jsonscan import WINDOW, Expired, Limits, ScanError, loads_bounded, scan

WIDE = 10 ** 6


def limits(depth=WIDE, containers=WIDE, values=WIDE, strings=WIDE):
    return Limits(max_depth=depth, max_containers=containers, max_values=values, max_strings=strings)


@pytest.mark.parametrize("data, lim, why", [
    (b'["a","b"]', limits(strings=2), None),
    (b'["a","b","c"]', limits(strings=2), "3 strings"),
    (b"[1,2]", limits(strings=0), None),                    # no string at all: zero strings
    (b"[{},[]]", limits(containers=3), None),
    (b"[{},{}]", limits(containers=2), "3 arrays and objects"),
    (b"{}", limits(containers=0), "1 arrays and objects"),
    (b'{"a":1,"b":2}', limits(values=3), None),              # 2 ':' and 1 ','
    (b'{"a":1,"b":2}', limits(values=2), "3 values"),
    (b'{"a":{"b":1}}', limits(values=1), "2 values"),
    (b"[[[]]]", limits(depth=3), None),
    (b"[[[]]]", limits(depth=2), "deeper than 2"),
    (b"[{[]}]", limits(depth=2), "deeper than 2"),            # '{' nests like '['
])
def test_each_limit_at_its_edge(data, lim, why):
    if why is None:
        scan(data, lim)
    else:
        with pytest.raises(ScanError, match=why):
            scan(data, lim)


def test_loads_bounded_scans_before_it_parses():
    assert loads_bounded(b'{"a":[1,2]}', limits(depth=2)) == {"a": [1, 2]}
    with pytest.raises(ScanError, match="deeper than 2"):
        loads_bounded(b"[[[]]]", limits(depth=2))


def test_nesting_json_itself_cannot_parse_is_a_scan_error():
    """Limits wide enough to let the scan pass: json.loads's RecursionError comes back
    as a ScanError, not as a bare RecursionError (and not as a missing result)."""
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ScanError, match="nested too deeply"):
        loads_bounded(deep, limits(depth=10 ** 7, containers=10 ** 7))


def test_depth_is_carried_from_one_window_to_the_next():
    """The depth profile runs over 1 MiB windows; the depth at the end of one window is
    where the next starts, so a document that opens in one window and closes in the next
    is scanned as a whole."""
    pad = b" " * WINDOW
    scan(b"[[[" + pad + b"]]]", limits(depth=3))                      # balanced across windows
    with pytest.raises(ScanError, match="deeper than 3"):
        scan(b"[[" + pad + b"[[" + pad + b"]]]]", limits(depth=3))   # too deep only in sum
    with pytest.raises(ScanError, match="closing"):
        scan(b"[[" + pad + b"]]]", limits())                          # one close too many
    scan(b"[[" + pad + b"[" + b" " * 10 + b"]" + pad + b"]]", limits(depth=3))
    # The first window's very last byte opens: the depth it carries includes that byte.
    scan(b" " * (WINDOW - 1) + b"[" + b"]", limits(depth=1))


def test_a_string_quote_in_a_window_does_not_break_the_depth():
    scan(b'["' + b"]" * 10 + b'"' + b" " * WINDOW + b"]", limits(depth=1))


def test_limits_are_frozen():
    lim = limits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        lim.max_depth = 1


class Clock:
    """``time`` for jsonscan: the first ``good`` readings are before the deadline,
    later ones after it."""

    def __init__(self, good: int, before: float = 0.0):
        self.good, self.before, self.reads = good, before, 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.before if self.reads <= self.good else 200.0


DOC = b'{"a":[1,2,3]}'


@pytest.mark.parametrize("good, stage", [
    (0, "was arriving"),
    (1, "strings were scanned"),
    (2, "nesting was scanned"),
    (3, "was parsed"),
])
def test_each_deadline_check_is_in_its_place(monkeypatch, good, stage):
    """The deadline is read before the scan, after the strings, after each window with
    brackets and after json.loads: a peer cannot buy CPU past the session's budget at
    any of those stages."""
    monkeypatch.setattr(jsonscan, "time", Clock(good))
    with pytest.raises(Expired, match=f"deadline passed while .*{stage}"):
        loads_bounded(DOC, limits(), deadline=100.0)


def test_the_deadline_itself_is_not_past(monkeypatch):
    clock = Clock(good=10 ** 6, before=100.0)
    monkeypatch.setattr(jsonscan, "time", clock)
    assert loads_bounded(DOC, limits(), deadline=100.0) == {"a": [1, 2, 3]}
    assert clock.reads == 4
    assert loads_bounded(DOC, limits()) == {"a": [1, 2, 3]}          # no deadline: never read
    assert clock.reads == 4
