"""The ranking's batch hot path without Redis: feature rows from blocks, the parsed
feature cache and the packed HMGETs."""
from __future__ import annotations

import hiredis
import numpy as np

from domain.ranking_features import (
    FEATURE_NAMES,
    candidate_columns,
    empty_rows,
    feature_block,
    feature_matrix,
    media_codes,
    viewer_columns,
)
from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES
from stores.ranker import RowCache
from stores.redis.multiread import HashReads

P, A = len(POST_FEATURES), len(AUTHOR_FEATURES)


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_feature_matrix_columns_by_name():
    photo, video = MEDIA_TYPES.index("PHOTO"), MEDIA_TYPES.index("VIDEO")
    post = {POST_FEATURES[0]: np.array([1.0, np.nan, 3.0])}  # the other names: all missing
    author = {AUTHOR_FEATURES[1]: np.array([7.0, 8.0, 9.0])}
    media_affinity = {"PHOTO": np.array([2.0, 0.0, np.nan]), "VIDEO": np.array([6.0, 0.0, 4.0])}
    x = feature_matrix(post, author, np.array([0.5, np.nan, 1.5]), media_affinity,
                       np.array(["PHOTO", "VIDEO", "GIF"], dtype=object),
                       np.array([60_000, 120_000, 0]))
    assert x.dtype == np.float32 and x.shape == (3, len(FEATURE_NAMES))
    assert np.array_equal(x[:, 0], [1.0, np.nan, 3.0], equal_nan=True)
    assert np.isnan(x[:, 1:P]).all() and np.isnan(x[:, P]).all()
    assert x[:, P + 1].tolist() == [7.0, 8.0, 9.0]
    assert x[:, col("viewer_author_affinity")].tolist() == [0.5, 0.0, 1.5]  # NaN counts as 0
    # PHOTO row: 2 of 8; VIDEO row: 0 of 0 (no share); unknown media: none of 4.
    assert x[:, col("viewer_media_affinity")].tolist() == [2.0, 0.0, 0.0]
    assert np.array_equal(x[:, col("viewer_media_share")], [0.25, np.nan, 0.0], equal_nan=True)
    assert x[:, col("post_age_min")].tolist() == [1.0, 2.0, 0.0]
    one_hot = x[:, col(f"media_{MEDIA_TYPES[0]}"):]
    assert one_hot[0].tolist() == np.eye(len(MEDIA_TYPES))[photo].tolist()
    assert one_hot[1].tolist() == np.eye(len(MEDIA_TYPES))[video].tolist()
    assert one_hot[2].tolist() == [0.0] * len(MEDIA_TYPES)


def _blocks(n: int, viewers: int, seed: int = 3):
    rng = np.random.default_rng(seed)

    def some(*shape):
        a = rng.random(shape)
        a[rng.random(shape) < 0.2] = np.nan
        return a
    media = np.array([(*MEDIA_TYPES, "GIF")[i] for i in rng.integers(0, len(MEDIA_TYPES) + 1, n)],
                     dtype=object)
    return (some(n, P), some(n, A), some(n), some(viewers, len(MEDIA_TYPES)),
            rng.integers(0, viewers, n), media_codes(media), rng.integers(0, 10**8, n))


def test_blocks_per_viewer_give_the_matrix_of_per_row_columns():
    post, author, affinity, per_viewer, row_viewer, code, age = _blocks(500, 7)
    names = (*MEDIA_TYPES, "GIF")
    media = np.array([names[c] for c in code], dtype=object)
    expected = feature_matrix(
        {n: post[:, j] for j, n in enumerate(POST_FEATURES)},
        {n: author[:, j] for j, n in enumerate(AUTHOR_FEATURES)}, affinity,
        {m: per_viewer[row_viewer, j] for j, m in enumerate(MEDIA_TYPES)}, media, age)
    got = feature_block(post, author, affinity, per_viewer, row_viewer, code, age)
    assert np.array_equal(got, expected, equal_nan=True)


def test_rows_patched_after_the_viewers_halves_equal_the_whole():
    post, author, affinity, per_viewer, row_viewer, code, age = _blocks(300, 5)
    whole = feature_block(post, author, affinity, per_viewer, row_viewer, code, age)
    out = empty_rows(300)
    rows = np.arange(0, 300, 7)
    stale_post, stale_author = post.copy(), author.copy()
    stale_post[rows], stale_author[rows] = np.nan, -1.0   # not known yet at first
    candidate_columns(out, stale_post, stale_author, code, age)
    candidate_columns(out, post[rows], author[rows], code[rows], age[rows], rows)
    viewer_columns(out, affinity, per_viewer, row_viewer, code)
    assert np.array_equal(out, whole, equal_nan=True)


def test_media_codes():
    assert media_codes(np.array([*MEDIA_TYPES, "", "photo"], dtype=object)).tolist() == \
        [*range(len(MEDIA_TYPES)), -1, -1]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_row_cache_holds_rows_for_their_ttl_and_forgets_dropped_ids():
    clock = Clock()
    cache = RowCache(10.0, 2, clock=clock)
    rows, missing = cache.get(np.array([5, 9]))
    assert missing.tolist() == [True, True] and np.isnan(rows).all()
    cache.put(np.array([9, 5]), np.array([[9.0, 9.5], [5.0, np.nan]]))
    clock.now += 5
    cache.put(np.array([7]), np.array([[7.0, 7.5]]))
    rows, missing = cache.get(np.array([1, 5, 7, 9, 11]))
    assert missing.tolist() == [True, False, False, False, True]
    assert np.array_equal(rows, [[np.nan, np.nan], [5.0, np.nan], [7.0, 7.5], [9.0, 9.5],
                                 [np.nan, np.nan]], equal_nan=True)
    cache.drop([7])
    clock.now += 6   # 5 and 9 are 11 s old, 7 was dropped
    rows, missing = cache.get(np.array([5, 7, 9]))
    assert missing.tolist() == [True, True, True]
    cache.put(np.array([5]), np.array([[50.0, 51.0]]))   # a new row replaces the old one
    rows, missing = cache.get(np.array([5]))
    assert rows.tolist() == [[50.0, 51.0]] and not missing.any()


def test_row_cache_bounds_its_entries_and_ttl_zero_keeps_nothing():
    clock = Clock()
    cache = RowCache(10.0, 1, max_entries=3, clock=clock)
    cache.put(np.array([1, 2]), np.array([[1.0], [2.0]]))
    cache.put(np.array([3, 4]), np.array([[3.0], [4.0]]))   # 4 > 3: the old ones go
    assert cache.get(np.array([1, 2, 3, 4]))[1].tolist() == [True, True, False, False]
    off = RowCache(0.0, 1, clock=clock)
    off.put(np.array([1]), np.array([[1.0]]))
    assert off.get(np.array([1]))[1].tolist() == [True]


def _packed(reads: HashReads) -> bytes:
    return b"".join(reads._packed)


def test_hmgets_pack_as_hiredis_packs_them():
    keys = ["fb:pf:1", b"fb:pf:2", "fb:ü:3"]
    fields = ["like_1h", b"view_24h", 7]
    reads = HashReads(client=None)   # packing needs no connection
    reads.same(keys, fields)
    assert _packed(reads) == b"".join(hiredis.pack_command(("HMGET", k, *fields)) for k in keys)


def test_picked_fields_pack_as_the_same_fields_given_per_key():
    names = [45, 7, 1_000_000_000_123]
    index, bounds = [0, 2, 1, 2], [0, 2, 2, 4]   # the second key picks nothing
    picked, each = HashReads(client=None), HashReads(client=None)
    where = picked.pick(["a", "b", "c"], names, index, bounds)
    assert where == each.each(["a", "b", "c"], [[45, 1_000_000_000_123], [], [7, 1_000_000_000_123]])
    assert _packed(picked) == _packed(each) == b"".join(
        hiredis.pack_command(c) for c in (("HMGET", "a", 45, 1_000_000_000_123),
                                          ("HMGET", "c", 7, 1_000_000_000_123)))
