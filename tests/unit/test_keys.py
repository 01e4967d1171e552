"""The Redis key layout: stable names, prefix isolation, cluster hash tags."""
from __future__ import annotations

import inspect
import re

import pytest

from schemas.keys import KeyLayout

_TAG = re.compile(r"\{([^}]*)\}")


def _hash_tag(key: str) -> str:
    m = _TAG.search(key)
    assert m and m.group(1), key
    return m.group(1)


def _all_keys(layout: KeyLayout, entity_id: int = 42) -> dict[str, str]:
    keys = {}
    for name, method in inspect.getmembers(layout, inspect.ismethod):
        if name.startswith("_") or name.endswith("pattern"):
            continue
        params = list(inspect.signature(method).parameters)
        if params == ["user_ids"]:
            continue  # many keys of one kind at once (test_batch_builders)
        args = (["fanout", "ev-1"] if params == ["scope", "event_id"]
                else [entity_id] if params else [])   # the prefix's meta keys take none
        keys[name] = method(*args)
    return keys


def test_names_are_stable():
    k = KeyLayout()
    assert k.home_feed(7) == "fb:feed:{u:7}"
    assert k.author_timeline(7) == "fb:timeline:{u:7}"
    assert k.post(10) == "fb:post:{p:10}"
    assert k.ranked_feed(7) == "fb:ranked:{u:7}"
    assert k.story(5) == "fb:story:{s:5}"
    assert k.dedup("fanout", "ev-1") == "fb:dedup:fanout:ev-1"


def test_every_key_is_distinct_and_prefixed():
    keys = _all_keys(KeyLayout("t1"))
    assert len(keys) >= 18
    assert len(set(keys.values())) == len(keys)
    assert all(key.startswith("t1:") for key in keys.values())
    other = _all_keys(KeyLayout("t2"))
    assert not set(keys.values()) & set(other.values())


def test_batch_builders():
    k = KeyLayout("fb")
    users = [7, 70, 7_000_000_001]
    assert k.home_feeds(users) == [k.home_feed(u) for u in users]
    assert k.last_reads(users) == [k.last_read(u) for u in users]
    assert k.home_feeds(iter(users)) == k.home_feeds(users) and k.last_reads([]) == []


def test_prefix_pattern_matches_only_own_keys():
    import fnmatch

    a, b = KeyLayout("a"), KeyLayout("ab")
    assert fnmatch.fnmatchcase(a.home_feed(1), a.pattern())
    assert not fnmatch.fnmatchcase(b.home_feed(1), a.pattern())


def test_the_meta_keys_are_the_prefixs_own_and_not_views():
    import fnmatch

    a, b = KeyLayout("a"), KeyLayout("ab")
    assert a.generation() == "a:meta:generation" and a.restore_lock() == "a:meta:restore_lock"
    assert all(fnmatch.fnmatchcase(key, a.meta_pattern())
               for key in (a.generation(), a.restore_lock(), a.unfollowed(1)))
    assert not fnmatch.fnmatchcase(a.home_feed(1), a.meta_pattern())
    assert not fnmatch.fnmatchcase(b.generation(), a.meta_pattern())


def test_one_users_keys_share_a_hash_tag():
    k = KeyLayout()
    per_user = [k.home_feed, k.home_feed_staging, k.ranked_feed, k.ranked_meta,
                k.ranked_feed_previous, k.last_read, k.seen_stories, k.author_affinity,
                k.content_affinity, k.followers, k.following, k.author_timeline,
                k.author_features, k.author_stories, k.carried_posts]
    assert {_hash_tag(f(9)) for f in per_user} == {"u:9"}
    assert _hash_tag(k.post(9)) == _hash_tag(k.post_features(9)) == "p:9"
    assert _hash_tag(k.story(9)) == _hash_tag(k.story_viewers(9)) == "s:9"
    assert _hash_tag(k.home_feed(9)) != _hash_tag(k.home_feed(10))


@pytest.mark.parametrize("prefix", ["", "a:b", "x{y}", "has space", "*"])
def test_bad_prefixes_are_rejected(prefix):
    with pytest.raises(ValueError):
        KeyLayout(prefix)
