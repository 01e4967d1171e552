"""Pure helpers of the ranked store: input checks, the Redis value and the page reply."""
from __future__ import annotations

import numpy as np
import pytest

from stores.ranked import (
    RECORD,
    entry_records,
    page_args,
    parse_page,
    parse_value,
    ranked_value,
    swap_args,
)
from schemas.ranked import RankedEntry, RankedFeed, RankedPage


def test_entry_records_refuse_bad_input():
    assert entry_records([(1, 2, 3)]).tolist() == [(1, 2, 3.0)]
    with pytest.raises(ValueError, match="post 1 appears twice"):
        entry_records([RankedEntry(1, 2, 1.0), RankedEntry(1, 3, 0.5)])
    with pytest.raises(ValueError, match="non-finite score inf"):
        entry_records([RankedEntry(4, 2, 1.0), RankedEntry(5, 2, float("inf"))])
    with pytest.raises(ValueError, match="not \\(post id"):
        entry_records([(2**64, 1, 1.0)])
    with pytest.raises(ValueError, match="not \\(post id"):
        entry_records([(1, "x", 1.0)])
    assert entry_records([]).dtype == RECORD and len(entry_records([])) == 0


def test_entry_records_take_numpy_values():
    (row,) = entry_records([(np.int64(3), np.int64(4), np.float32(0.5))]).tolist()
    assert row == (3, 4, 0.5) and type(row[0]) is int and type(row[2]) is float


def test_value_round_trips_scores_exactly_in_rank_order():
    entries = (RankedEntry(5, 6, 0.1 + 0.2), RankedEntry(2**40 + 7, -3, -1.5e-07),
               RankedEntry(1, 1, 9.0))
    value = ranked_value(entry_records(entries), "xgb-20261206", 1_700_000_000_123)
    assert value[:19] == b"0001700000000123012"
    assert len(value) == 19 + 12 + 3 * RECORD.itemsize
    assert parse_value(7, value) == RankedFeed(7, entries, "xgb-20261206", 1_700_000_000_123)
    assert parse_value(7, None) is None
    empty = ranked_value(entry_records([]), "m", 5)
    assert parse_value(8, empty) == RankedFeed(8, (), "m", 5)


def test_swap_args_refuse_what_the_value_cannot_hold():
    records = entry_records([RankedEntry(5, 6, 1.0)])
    stamp, value, keep = swap_args(records, "m", 10, 60)
    assert (stamp, keep) == ("0000000000000010", 60) and parse_value(1, value).entries[0].post_id == 5
    with pytest.raises(ValueError, match="model_version"):
        swap_args(records, "", 10, 60)
    with pytest.raises(ValueError, match="model_version"):
        swap_args(records, "v" * 1000, 10, 60)
    with pytest.raises(ValueError, match="generated_at"):
        swap_args(records, "m", -1, 60)


def test_parse_page():
    records = entry_records([RankedEntry(9, 2, 0.5), RankedEntry(4, 7, -1.25)])
    head = b"0000000000001000002m1"
    reply = [1, head, 3, records.tobytes()]
    assert parse_page(reply, 1) == RankedPage(
        (RankedEntry(9, 2, 0.5), RankedEntry(4, 7, -1.25)), 1, 3, "m1", 1000, True)
    assert parse_page([0, head, 3, b""], 3) == RankedPage((), 3, 3, "m1", 1000, False)
    assert parse_page([0], 0) is None
    assert page_args(None, 20, 10) == ["", 20, 29]
    assert page_args(1000, 0, 5) == ["0000000000001000", 0, 4]
    with pytest.raises(ValueError):
        page_args(5, -1, 10)
