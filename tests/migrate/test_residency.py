"""The zero test round 0 and the prescan rely on (migrate/residency.py).

A page called zero that is not is a page the destination never receives:
the completeness digest would refuse the migration, so the test must be
exact on every mix of pages, on both of its paths (few pages whose first
word is zero: gathered and read; many: the block read whole in place)."""

import numpy as np
from hypothesis import given, settings, strategies as st

from migrate.residency import nonzero_pages, nonzero_run

PAGE = 4096


def reference(block: np.ndarray) -> np.ndarray:
    return (block != 0).any(axis=1)


def block_of(kinds, rng):
    """One page per kind: 'zero', 'head' (only its first word set), 'tail'
    (first word zero, one byte near the end set), 'full' (random)."""
    block = np.zeros((len(kinds), PAGE), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        if kind == "head":
            block[i, 3] = 1
        elif kind == "tail":
            block[i, PAGE - 1 - int(rng.integers(0, PAGE - 8))] = 0x80
        elif kind == "full":
            block[i] = rng.integers(1, 256, PAGE, dtype=np.uint8)
    return block


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["zero", "head", "tail", "full"]), min_size=1, max_size=64),
       st.integers(0, 2**32 - 1))
def test_every_mix_of_pages_is_told_exactly(kinds, seed):
    block = block_of(kinds, np.random.default_rng(seed))
    assert nonzero_pages(block).tolist() == reference(block).tolist()


def test_a_block_mostly_of_first_word_zero_pages_is_read_whole_and_exactly():
    """Above a quarter of 'maybe' pages the block is reduced in place: a page
    whose only non-zero byte is its last is still found, and zeros stay zero."""
    kinds = ["zero"] * 50 + ["tail"] * 10 + ["head"] * 4
    block = block_of(kinds, np.random.default_rng(7))
    assert nonzero_pages(block).tolist() == [False] * 50 + [True] * 14


def test_a_block_mostly_of_data_pages_gathers_the_few_others():
    kinds = ["full"] * 60 + ["tail", "zero", "tail", "zero"]
    block = block_of(kinds, np.random.default_rng(8))
    assert nonzero_pages(block).tolist() == [True] * 61 + [False, True, False]


def test_a_run_the_host_never_backed_is_zero_without_reading_it():
    block = block_of(["full"] * 8, np.random.default_rng(9))
    # 'fresh' says never backed: believed (the kernel's answer), not read.
    assert not nonzero_run(block, 2, 4, np.ones(8, dtype=bool)).any()
    # Partly backed: the run is read.
    fresh = np.ones(8, dtype=bool)
    fresh[3] = False
    assert nonzero_run(block, 2, 4, fresh).all()
    assert nonzero_run(block, 0, 8, None).all()
