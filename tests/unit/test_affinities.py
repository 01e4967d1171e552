"""The affinity records' layout and batch lookup (stores.redis.affinities), without Redis."""
from __future__ import annotations

import numpy as np
import pytest

from stores.redis import affinities
from stores.redis.affinities import ABSENT_STAMP, RECORD, lookup, pack, unpack

BIG = 1 << 62


def test_pack_sorts_by_author_and_unpacks_exactly():
    blob = pack([45, -3, BIG, 7], [1.5, 0.25, -2.0, 0.1], [10, 11, 12, 2**53 + 1])
    assert len(blob) == 4 * RECORD.itemsize == 96
    authors, values, stamps = unpack(blob)
    assert authors.tolist() == [-3, 7, 45, BIG]
    assert values.tolist() == [0.25, 0.1, 1.5, -2.0]
    assert stamps.tolist() == [11, 2**53 + 1, 10, 12]
    # Byte order is numeric order (what the merge script's comparison relies on).
    keys = [blob[i:i + 8] for i in range(0, len(blob), 24)]
    assert keys == sorted(keys)
    assert unpack(None)[0].tolist() == [] and unpack(b"")[0].tolist() == []


def test_pack_refuses_an_author_twice_and_unpack_a_torn_string():
    with pytest.raises(ValueError, match="twice"):
        pack([1, 2, 1], [0.0, 0.0, 0.0], [1, 1, 1])
    with pytest.raises(ValueError, match="24-byte"):
        unpack(pack([1], [1.0], [1])[:-1])


@pytest.mark.parametrize("dense", [True, False], ids=["table", "searchsorted"])
def test_lookup_finds_each_viewers_authors_as_a_dict_would(dense, monkeypatch):
    if not dense:  # no table is small enough: every lookup searches
        monkeypatch.setattr(affinities, "_DENSE_PER_QUERY", 0)
        monkeypatch.setattr(affinities, "_DENSE_MIN", 0)
    rng = np.random.default_rng(7)
    universe = rng.choice(np.arange(-500, 10**6), 400, replace=False)
    held = []
    for _ in range(40):
        mine = rng.choice(universe, int(rng.integers(0, 60)), replace=False)
        held.append({int(a): (float(rng.random()), int(rng.integers(1, 10**15))) for a in mine})
    blobs = [pack(list(h), [v for v, _ in h.values()], [s for _, s in h.values()]) if h else
             (None if i % 2 else b"") for i, h in enumerate(held)]
    authors = rng.permutation(universe[:300]).tolist()  # any order; the store may pass these
    wanted = [rng.choice(len(authors), int(rng.integers(0, 30)), replace=False) for _ in held]
    index = np.concatenate(wanted).astype(np.int64)
    bounds = np.cumsum([0, *map(len, wanted)])
    values, stamps = lookup(blobs, authors, index, bounds)
    expect = [held[i].get(authors[j], (0.0, ABSENT_STAMP))
              for i, some in enumerate(wanted) for j in some]
    assert values.tolist() == [v for v, _ in expect]
    assert stamps.tolist() == [s for _, s in expect]
    assert 20 < (stamps != ABSENT_STAMP).sum() < len(stamps) - 20  # hits and misses both


def test_lookup_with_nothing_wanted_or_nothing_held():
    blob = pack([5], [1.0], [9])
    assert [a.tolist() for a in lookup([blob, None], [], [], [0, 0, 0])] == [[], []]
    values, stamps = lookup([None, blob], [5], [0, 0], [0, 1, 2])
    assert values.tolist() == [0.0, 1.0] and stamps.tolist() == [ABSENT_STAMP, 9]


def test_lookup_refuses_records_out_of_order():
    swapped = pack([1], [1.0], [1]) + pack([0], [1.0], [1])
    with pytest.raises(ValueError, match="not sorted"):
        lookup([swapped], [0, 1], [0, 1], [0, 2])
