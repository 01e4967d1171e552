"""Pure helpers of the ranked store: input checks and the Redis reply parsing."""
from __future__ import annotations

import pytest

from stores.ranked import check_entries, page_args, parse_page, swap_args
from schemas.ranked import RankedEntry, RankedPage


def test_check_entries_normalises_and_refuses_bad_input():
    assert check_entries([(1, 2, 3)]) == [RankedEntry(1, 2, 3.0)]
    with pytest.raises(ValueError):
        check_entries([RankedEntry(1, 2, 1.0), RankedEntry(1, 3, 0.5)])
    with pytest.raises(ValueError):
        check_entries([RankedEntry(1, 2, float("inf"))])


def test_swap_args_keep_scores_exact():
    args = swap_args([RankedEntry(5, 6, 0.1 + 0.2), RankedEntry(7, 8, -1.5e-07)], "m", 10, 60)
    assert args == [10, "m", 60, "5,7", "6,8", f"{0.1 + 0.2!r},-1.5e-07"]
    assert [float(s) for s in args[-1].split(",")] == [0.1 + 0.2, -1.5e-07]
    with pytest.raises(ValueError):
        swap_args([], "", 10, 60)


def test_check_entries_normalises_numpy_values():
    import numpy as np

    (e,) = check_entries([(np.int64(3), np.int64(4), np.float32(0.5))])
    assert e == RankedEntry(3, 4, 0.5) and type(e.post_id) is int and type(e.score) is float


def test_parse_page():
    reply = [1, [b"m1", b"1000", b"3"], [b"9", b"4"], [b"2:0.5", b"7:-1.25"]]
    assert parse_page(reply, 1) == RankedPage(
        (RankedEntry(9, 2, 0.5), RankedEntry(4, 7, -1.25)), 1, 3, "m1", 1000, True)
    assert parse_page([0, [None, None, None], [], []], 0) is None
    assert page_args(None, 20, 10) == ["", 20, 29]
    with pytest.raises(ValueError):
        page_args(5, -1, 10)
