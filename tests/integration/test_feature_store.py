"""OnlineFeatureStore against the real Redis: newer-wins, TTL at read, decay, one round trip."""
from __future__ import annotations

import random

import pytest

from stores.redis.features import OnlineFeatureStore
from schemas.features import (
    AFFINITY,
    AUTHOR,
    POST,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    FeatureTTLs,
    FeatureValue,
)

pytestmark = pytest.mark.integration

NOW = 1_700_000_000_000
HOUR = 3_600_000
HALF_LIFE = 10 * HOUR
TTLS = FeatureTTLs(post_ms=48 * HOUR, author_ms=8 * 24 * HOUR, viewer_author_ms=30 * 24 * HOUR,
                   viewer_media_ms=30 * 24 * HOUR)


@pytest.fixture
def store(stack, key_prefix):
    s = OnlineFeatureStore.from_url(stack.redis_url, key_prefix=key_prefix, ttls=TTLS,
                                    half_life_ms=HALF_LIFE)
    yield s
    s.close()


class _RoundTrips:
    """Counts pipeline executions and direct commands of a store's client."""

    def __init__(self, store):
        self.count = 0
        original_pipeline, original_execute = store.client.pipeline, store.client.execute_command

        def pipeline(*args, **kwargs):
            pipe = original_pipeline(*args, **kwargs)
            execute = pipe.execute

            def counted(*a, **kw):
                self.count += 1
                return execute(*a, **kw)
            pipe.execute = counted
            return pipe

        def command(*args, **kwargs):
            self.count += 1
            return original_execute(*args, **kwargs)

        store.client.pipeline = pipeline
        store.client.execute_command = command


def test_hydrate_reads_everything_in_one_round_trip(store):
    store.write([
        FeatureValue(POST, "101", "like_1h", 3.0, NOW - HOUR),
        FeatureValue(POST, "101", "engagement_rate_1h", 0.25, NOW - HOUR),
        FeatureValue(POST, "102", "view_24h", 40.0, NOW - HOUR),
        FeatureValue(AUTHOR, "45", "posts_7d", 4.0, NOW - HOUR),
        FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 8.0, NOW - 2 * HALF_LIFE),
        FeatureValue(VIEWER_AUTHOR, "8:45", AFFINITY, 5.0, NOW),  # another viewer
        FeatureValue(VIEWER_MEDIA, "7:VIDEO", AFFINITY, 2.0, NOW - HALF_LIFE),
    ])
    trips = _RoundTrips(store)
    got = store.hydrate(7, [101, 102, 103, 101], [45, 46, 45, 45], NOW)
    assert trips.count == 1
    assert got.posts == [{"like_1h": 3.0, "engagement_rate_1h": 0.25}, {"view_24h": 40.0}, {},
                         {"like_1h": 3.0, "engagement_rate_1h": 0.25}]
    assert got.authors == [{"posts_7d": 4.0}, {}, {"posts_7d": 4.0}, {"posts_7d": 4.0}]
    assert got.author_affinity == pytest.approx([2.0, 0.0, 2.0, 2.0])
    assert got.content_affinity == pytest.approx({"VIDEO": 1.0})
    # The single-purpose reads agree with hydrate.
    assert store.post_features([102, 101], NOW) == [got.posts[1], got.posts[0]]
    assert store.author_features([46, 45], NOW) == [{}, {"posts_7d": 4.0}]
    assert store.author_affinity(7, [46, 45], NOW) == pytest.approx([0.0, 2.0])
    assert store.author_affinity(7, [], NOW) == []
    assert store.content_affinity(7, NOW) == pytest.approx({"VIDEO": 1.0})
    assert store.content_affinity(9, NOW) == {}


def test_newer_wins_so_a_replay_never_rolls_back(store):
    history = [FeatureValue(POST, "1", "like_1h", float(i), NOW + i * 60_000) for i in range(10)]
    late_pane = FeatureValue(POST, "1", "like_1h", 99.0, NOW + 9 * 60_000, version=1)
    assert store.write(history + [late_pane]) == 1  # only the winner of a batch is sent
    assert store.raw(POST, "1") == {"like_1h": (99.0, NOW + 9 * 60_000)}
    replay = history + [late_pane]
    for _ in range(5):
        random.shuffle(replay)
        for v in replay:
            store.write([v])
        assert store.raw(POST, "1") == {"like_1h": (99.0, NOW + 9 * 60_000)}
    # The same value again is no write at all.
    assert store.write([late_pane]) == 0
    # Same stamp, different values: the greater one, whatever the order.
    a = FeatureValue(POST, "2", "save_1h", 1.0, NOW)
    b = FeatureValue(POST, "2", "save_1h", 2.0, NOW)
    store.write([b])
    store.write([a])
    assert store.raw(POST, "2") == {"save_1h": (2.0, NOW)}


def test_reads_ignore_values_older_than_the_ttl_even_if_redis_holds_them(store, redis_client):
    store.write([
        FeatureValue(POST, "5", "like_1h", 1.0, NOW - TTLS.post_ms - 1),
        FeatureValue(POST, "5", "like_24h", 2.0, NOW - TTLS.post_ms),
        FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 1.0, NOW - TTLS.viewer_author_ms - 1),
        FeatureValue(VIEWER_MEDIA, "7:PHOTO", AFFINITY, 1.0, NOW - TTLS.viewer_media_ms - 1),
    ])
    key = store.keys.post_features(5)
    assert store.raw(POST, "5") == {"like_1h": (1.0, NOW - TTLS.post_ms - 1),
                                    "like_24h": (2.0, NOW - TTLS.post_ms)}
    # Key TTL runs on processing time: set at the write, as long as the entity's TTL.
    assert 0 < redis_client.pttl(key) <= TTLS.post_ms
    got = store.hydrate(7, [5], [45], NOW)
    assert got.posts == [{"like_24h": 2.0}]
    assert got.author_affinity == [0.0]
    assert got.content_affinity == {}


def test_write_rejects_unknown_entities(store):
    with pytest.raises(ValueError, match="entity type"):
        store.write([FeatureValue("story", "1", "x", 1.0, NOW)])
    with pytest.raises(ValueError, match="pair"):
        store.write([FeatureValue(VIEWER_AUTHOR, "745", AFFINITY, 1.0, NOW)])


def test_top_followers_are_newer_wins_and_trimmed(stack, key_prefix):
    from stores.redis.feeds import RedisFeedStore

    feed = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    try:
        key = feed.keys.top_followers(45)
        assert feed.apply_follower_engagement({45: {7: (3.0, 100), 8: (2.0, 100),
                                                    9: (1.0, 100)}}, keep=10) == 3
        # Older stamps (a replay) change nothing, newer ones do, None removes.
        assert feed.apply_follower_engagement({45: {7: (0.5, 99), 8: (5.0, 101),
                                                    9: (None, 101)}}, keep=10) == 2
        assert feed.client.zrevrange(key, 0, -1, withscores=True) == [(b"8", 5.0), (b"7", 3.0)]
        assert feed.apply_follower_engagement({45: {9: (1.0, 100)}}) == 0  # removal was newer
        feed.apply_follower_engagement({45: {10: (4.0, 102), 11: (0.1, 102)}}, keep=2)
        assert feed.client.zrevrange(key, 0, -1) == [b"8", b"10"]
        assert sorted(feed.client.hkeys(feed.keys.top_followers_stamps(45))) == \
            [b"10", b"8", b"9"]
    finally:
        feed.close()


def test_a_batch_hydrate_gives_what_hydrate_gives_per_viewer(store):
    """``hydrate_batch`` (plain HMGETs written at once, one parse) against ``hydrate``
    (one pipeline, per-value parse): fresh, expired, absent and decayed values."""
    store.write([
        FeatureValue(POST, "101", "like_1h", 3.0, NOW - HOUR),
        FeatureValue(POST, "102", "view_24h", 40.0, NOW - 49 * HOUR),         # expired
        FeatureValue(AUTHOR, "45", "posts_7d", 4.0, NOW - HOUR),
        FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 8.0, NOW - 2 * HALF_LIFE),
        FeatureValue(VIEWER_AUTHOR, "7:46", AFFINITY, 1.5, NOW - 31 * 24 * HOUR),  # expired
        FeatureValue(VIEWER_AUTHOR, "8:46", AFFINITY, 5.0, NOW),
        FeatureValue(VIEWER_MEDIA, "7:VIDEO", AFFINITY, 2.0, NOW - HALF_LIFE),
        FeatureValue(VIEWER_MEDIA, "8:PHOTO", AFFINITY, 1.0, NOW),
    ])
    posts, authors = [101, 102, 103], [45, 46]
    viewers, viewer_authors = [7, 8, 9], [[45, 46], [46], []]
    batch = store.hydrate_batch(posts, authors, viewers, viewer_authors, NOW)
    from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES

    one = store.hydrate(None, posts, authors, NOW)
    for got, want, names in ((batch.posts, one.posts, POST_FEATURES),
                             (batch.authors, one.authors, AUTHOR_FEATURES)):
        assert [{n: v for n, v in zip(names, row) if v == v} for row in got.tolist()] == want
    affinity = []
    for i, viewer in enumerate(viewers):
        single = store.hydrate(viewer, (), viewer_authors[i], NOW, author_features=False)
        affinity += single.author_affinity
        assert dict(zip(MEDIA_TYPES, batch.content[i].tolist())) == pytest.approx(
            {m: single.content_affinity.get(m, 0.0) for m in MEDIA_TYPES})
    assert batch.affinity.tolist() == pytest.approx(affinity)
    assert affinity == pytest.approx([2.0, 0.0, 5.0])


def test_batched_reads_leave_no_reply_behind_on_an_error_or_when_abandoned(stack, key_prefix):
    """A connection whose replies were not all read never goes back to the pool as it
    is: the next command on the client gets its own reply."""
    from redis import ResponseError

    from stores.redis.client import new_client
    from stores.redis.multiread import HashReads

    client = new_client(stack.redis_url)
    try:
        hashes = [f"{key_prefix}:h{i}" for i in range(50)]
        for i, key in enumerate(hashes):
            client.hset(key, mapping={"a": i, "b": -i})
        client.set(f"{key_prefix}:s", "a string")
        reads = HashReads(client)
        at = reads.same(hashes, ["b", "absent", "a"])
        picked = reads.pick(hashes[:3], ["a", "b"], [1, 0, 0], [0, 2, 2, 3])
        assert reads.send().take(at) == [[str(-i).encode(), None, str(i).encode()]
                                         for i in range(50)]
        assert reads.take(picked) == [[b"0", b"0"], [], [b"2"]]
        strings = HashReads(client)
        got = strings.strings([f"{key_prefix}:s", f"{key_prefix}:none", f"{key_prefix}:s"])
        assert strings.strings([]) == slice(1, 1)
        assert strings.send().take_strings(got) == [b"a string", None, b"a string"]
        strings.close()
        broken = HashReads(client)
        broken.same([*hashes[:5], f"{key_prefix}:s", *hashes[5:]], ["a"])
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            broken.replies()
        assert client.get(f"{key_prefix}:s") == b"a string"
        with HashReads(client) as abandoned:
            abandoned.same(hashes, ["a", "b"])
            abandoned.send()
        assert client.get(f"{key_prefix}:s") == b"a string"
        assert client.hget(hashes[3], "a") == b"3"
    finally:
        client.close()


def _replayed_in_any_order(store, history, field_of, stored, rng) -> dict:
    """Write ``history`` in shuffled batches three times over; after each pass what
    ``stored()`` returns is the newer-wins winner per ``field_of(value)``, and the whole
    history once more writes nothing. Returns the winners ``{field: (stamp, value)}``."""
    winner: dict[str, tuple] = {}
    for v in history:
        winner[field_of(v)] = max(winner.get(field_of(v), (-1, 0.0)), (v.write_stamp_us, v.value))
    history = list(history)
    for _ in range(3):
        rng.shuffle(history)
        for start in range(0, len(history), 7):
            store.write(history[start:start + 7])
        assert stored() == {f: (value, stamp // 1000) for f, (stamp, value) in winner.items()}
    assert store.write(history) == 0  # all older or equal: nothing written
    return winner


def test_affinities_merge_newer_wins_per_author_in_one_sorted_string(store, redis_client):
    """The viewer's affinity string (``stores.redis.affinities``) after random batches of
    writes, replayed in random orders, equals the newer-wins winner of each author."""
    rng = random.Random(11)
    authors = [-7, 0, 3, 45, 1 << 40, (1 << 62) + 5]
    history = [FeatureValue(VIEWER_AUTHOR, f"9:{rng.choice(authors)}", AFFINITY,
                            rng.choice([0.5, 1.0, 2.0]), NOW + rng.randrange(5),
                            version=rng.randrange(2)) for _ in range(60)]
    winner = _replayed_in_any_order(store, history, lambda v: v.entity_id.split(":")[1],
                                    lambda: store.raw(VIEWER_AUTHOR, "9:0"), rng)
    key = store.keys.author_affinity(9)
    assert redis_client.type(key) == b"string"
    assert len(redis_client.get(key)) == 24 * len(winner)
    assert 0 < redis_client.pttl(key) <= TTLS.viewer_author_ms
    got = store.hydrate(9, (), [3, 99, -7], NOW + 5)
    assert got.author_affinity == pytest.approx(
        [winner[a][1] * 2 ** (-(NOW + 5 - winner[a][0] // 1000) / HALF_LIFE) if a in winner
         else 0.0 for a in ("3", "99", "-7")])


def test_a_viewer_past_prune_at_authors_drops_stale_ones_on_the_next_write(store):
    from stores.redis.affinities import PRUNE_AT

    stale = [FeatureValue(VIEWER_AUTHOR, f"5:{a}", AFFINITY, 1.0, NOW - TTLS.viewer_author_ms - 1)
             for a in range(0, 2 * PRUNE_AT, 2)]
    fresh = [FeatureValue(VIEWER_AUTHOR, f"5:{a}", AFFINITY, 1.0, NOW)
             for a in range(1, PRUNE_AT, 2)]
    assert store.write(stale[:PRUNE_AT // 2] + fresh) == PRUNE_AT  # at PRUNE_AT: all kept
    assert len(store.raw(VIEWER_AUTHOR, "5:0")) == PRUNE_AT
    # Past it: records older than the TTL before the write's newest stamp are dropped.
    assert store.write(stale[PRUNE_AT // 2:]) == PRUNE_AT // 2
    assert len(store.raw(VIEWER_AUTHOR, "5:0")) == PRUNE_AT + PRUNE_AT // 2
    newest = FeatureValue(VIEWER_AUTHOR, f"5:{PRUNE_AT + 1}", AFFINITY, 1.0, NOW)
    assert store.write(stale[:3] + [newest]) == 1
    assert sorted(map(int, store.raw(VIEWER_AUTHOR, "5:0"))) == list(range(1, PRUNE_AT + 2, 2))


def test_a_torn_affinity_string_is_an_error_not_a_misread(store, redis_client):
    from redis import ResponseError

    redis_client.set(store.keys.author_affinity(4), b"x" * 25)
    with pytest.raises(ResponseError, match="24-byte records"):
        store.write([FeatureValue(VIEWER_AUTHOR, "4:1", AFFINITY, 1.0, NOW)])
    with pytest.raises(ValueError, match="24-byte records"):
        store.hydrate(4, (), [1], NOW)


def test_post_and_author_features_are_one_string_of_slots_newer_wins(store, redis_client):
    """Posts and authors (``stores.redis.slots``): a slot per feature name, newer-wins per
    slot, the string rewritten whole; a name outside the layout and a string of another
    size are errors, not misreads."""
    from redis import ResponseError

    from schemas.features import AUTHOR_FEATURES, POST_FEATURES

    history = [FeatureValue(POST, "3", name, float(i), NOW + i, version=i % 3)
               for i, name in enumerate(POST_FEATURES * 3)]
    winner = _replayed_in_any_order(store, history, lambda v: v.name,
                                    lambda: store.raw(POST, "3"), random.Random(5))
    assert set(winner) == set(POST_FEATURES)
    key = store.keys.post_features(3)
    assert redis_client.type(key) == b"string"
    assert len(redis_client.get(key)) == 16 * len(POST_FEATURES)
    assert 0 < redis_client.pttl(key) <= TTLS.post_ms
    store.write([FeatureValue(AUTHOR, "8", AUTHOR_FEATURES[1], 5.0, NOW)])
    assert store.raw(AUTHOR, "8") == {AUTHOR_FEATURES[1]: (5.0, NOW)}
    assert store.author_features([8], NOW) == [{AUTHOR_FEATURES[1]: 5.0}]
    with pytest.raises(ValueError, match="not one of"):
        store.write([FeatureValue(POST, "3", "likes_forever", 1.0, NOW)])
    redis_client.set(store.keys.post_features(4), b"x" * 17)
    with pytest.raises(ResponseError, match="not 12 slots"):
        store.write([FeatureValue(POST, "4", "like_1h", 1.0, NOW)])
    with pytest.raises(ValueError, match="not 12 slots"):
        store.post_features([4], NOW)
