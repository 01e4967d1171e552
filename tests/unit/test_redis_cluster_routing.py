"""How Redis Cluster calls are split and routed, without a server: ``BatchLayout``
(the batch scripts' split by hash slot), ``command_key`` (the asyncio client's
routing) and the topology's addresses in ``StackSettings``."""
from __future__ import annotations

import pytest
from redis.crc import key_slot

from infra.settings import StackSettings
from schemas.keys import KeyLayout
from stores.redis.aio import command_key, pack_command
from stores.redis.client import BatchLayout, is_cluster_url

KEYS = KeyLayout("t")


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_every_key_of_a_user_shares_its_slot_and_users_spread():
    user = [KEYS.home_feed(7), KEYS.followers(7), KEYS.author_timeline(7), KEYS.celebrity(7),
            KEYS.last_read(7), KEYS.top_followers(7)]
    assert len({_slot(k) for k in user}) == 1
    assert len({_slot(KEYS.home_feed(u)) for u in range(100)}) > 50


def test_a_split_call_keeps_each_items_keys_and_args_and_merges_replies_in_order():
    # _EDGES_OUT's shape: no header, 3 keys and 5 args per item.
    layout = BatchLayout(0, 3, args_per_item=5)
    users = [1, 2, 3, 4, 5, 6]
    keys = [k for u in users for k in (KEYS.following_edges(u), KEYS.following(u),
                                       KEYS.followed_celebrities(u))]
    args = [a for u in users for a in (u * 10, 1, 1, 100 + u, "")]
    calls, merge = layout.split(keys, args)
    assert len(calls) == len({_slot(KEYS.following(u)) for u in users}) > 1
    seen = []
    for call_keys, call_args in calls:
        assert len({_slot(k) for k in call_keys}) == 1
        assert len(call_keys) * 5 == len(call_args) * 3
        seen += [a for a in call_args[::5]]
    assert sorted(seen) == [u * 10 for u in users]
    # Each call answers per item, in its own order; the merge restores the caller's.
    replies = [[f"r{a}" for a in call_args[::5]] for _, call_args in calls]
    assert merge(replies) == [f"r{u * 10}" for u in users]


def test_counted_items_and_a_shared_header_go_to_every_call():
    # _ZSETS' shape: header (now, grace), 1 key, then #adds, #removes, 2 per add, 1 per remove.
    layout = BatchLayout(2, 1, counted=(2, 1), reply="sum")
    keys = [KEYS.author_stories(a) for a in (1, 2, 3)]
    args = [1000, 50, 1, 0, 9, "s1", 0, 2, "s2", "s3", 2, 1, 7, "s4", 8, "s5", "s6"]
    calls, merge = layout.split(keys, args)
    items = {}
    for call_keys, call_args in calls:
        assert call_args[:2] == [1000, 50]
        rest = call_args[2:]
        for key in call_keys:
            nadd, nrem = rest[0], rest[1]
            width = 2 + 2 * nadd + nrem
            items[key] = rest[:width]
            rest = rest[width:]
        assert rest == []
    assert items == {keys[0]: [1, 0, 9, "s1"], keys[1]: [0, 2, "s2", "s3"],
                     keys[2]: [2, 1, 7, "s4", 8, "s5", "s6"]}
    assert merge([1] * len(calls)) == len(calls)


def test_an_item_whose_keys_span_slots_is_refused():
    with pytest.raises(ValueError, match="span hash slots"):
        BatchLayout(0, 2).split([KEYS.home_feed(1), KEYS.home_feed(2)], [])


def test_the_async_client_routes_by_the_first_key_or_the_scripts_first_key():
    key = KEYS.home_feed(7)
    assert command_key(("ZREVRANGE", key, 0, 9)) == key.encode()
    assert command_key(pack_command(("HMGET", KEYS.post(3), "a", "b"))) == KEYS.post(3).encode()
    assert command_key(("EVALSHA", "abc", 2, key, KEYS.last_read(7), 5)) == key.encode()
    assert command_key(pack_command(("EVALSHA", "abc", 1, key, 5))) == key.encode()
    assert command_key(("EVALSHA", "abc", 0, 5)) is None
    assert command_key(("PING",)) is None


def test_the_cluster_topology_names_its_own_servers():
    single = StackSettings.from_env({})
    clustered = StackSettings.from_env({"FEEDBEAM_TOPOLOGY": "cluster"})
    assert not is_cluster_url(single.redis_url) and single.cassandra_host == single.host
    assert is_cluster_url(clustered.redis_url) and clustered.redis_url.endswith(":7001/0")
    assert clustered.cassandra_host == "127.0.0.2"
    with pytest.raises(ValueError, match="FEEDBEAM_TOPOLOGY"):
        StackSettings.from_env({"FEEDBEAM_TOPOLOGY": "mesh"})
