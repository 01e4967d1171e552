"""The ranking's pending-refresh queue against the real Redis: debounce, claims and leases,
the follow gate's put-offs, viral marks.

The queue's scripts decide what ``domain.ranking.Debounce`` states; driven with
a perfect clock (each claim exactly when the queue says the next user is
due), it refreshes at the times ``simulate_debounce`` computes.
"""
from __future__ import annotations

import pytest

from domain.ranking import Debounce, simulate_debounce
from schemas.keys import KeyLayout
from schemas.ranking import ENGAGED, FOLLOW_CHANGED, POST_CREATED, Trigger, decode_pending
from stores.redis.refresh_queue import RefreshQueue

pytestmark = pytest.mark.integration

T0 = 1_780_000_000_000


@pytest.fixture
def queue(redis_client, key_prefix):
    return RefreshQueue(redis_client, KeyLayout(key_prefix), shards=2,
                        debounce=Debounce(settle_ms=500, interval_ms=5_000, burst=2),
                        lease_ms=10_000)


def drive(queue: RefreshQueue, user: int, times: list[int]) -> list[tuple[int, list[int]]]:
    """Changes of ``user`` at ``times``; claims exactly when the queue says something is
    due and finishes each claim at once. Returns ``[(claim time, [change times])]``."""
    shard = queue.shard_of(user)
    out, next_at = [], None
    for t in sorted(times) + [None]:
        while next_at is not None and (t is None or next_at <= t):
            claim = queue.claim(shard, next_at, limit=10)
            (text,) = claim.refreshes.payloads
            seq, triggers = decode_pending(user, text)
            out.append((next_at, [tr.event_time for tr in triggers]))
            next_at = queue.finish(shard, [(user, seq)], [], next_at)
        if t is not None:
            next_at = queue.add([Trigger(user, t, ENGAGED)], t)[shard]
    return out


def test_refresh_times_are_the_debounce_rule(queue):
    times = [T0 + ms for ms in (0, 100, 300, 1_000, 1_200, 4_000, 6_000, 6_100, 30_000)]
    assert drive(queue, 7, times) == simulate_debounce(queue.debounce, times)
    assert queue.pending() == {}   # nothing left once every refresh finished


def test_claims_batch_due_users_and_a_lost_claim_comes_back(queue):
    shard = 0
    users = [2, 4, 6, 8]
    due = queue.add([Trigger(u, T0, ENGAGED) for u in users], T0)
    assert due == {shard: T0 + 500}
    assert queue.claim(shard, T0 + 499, limit=10).refreshes.users == []   # settling
    first = queue.claim(shard, T0 + 500, limit=3)
    assert first.refreshes.users == [2, 4, 6] and first.next_at_ms == T0 + 500
    assert queue.claim(shard, T0 + 500, limit=3).refreshes.users == [8]
    # A change of a user whose refresh is running waits for that refresh.
    queue.add([Trigger(2, T0 + 600, POST_CREATED, 70, 9, T0 + 600, "PHOTO")], T0 + 600)
    assert queue.claim(shard, T0 + 1_200, limit=10).refreshes.users == []
    seq = decode_pending(2, first.refreshes.payloads[0])[0]
    queue.finish(shard, [(2, seq), (4, seq)], [], T0 + 1_300)
    held = queue.pending()
    # The refresh took what it read; the change that came meanwhile stays, due after
    # a settle (a token is left in 2's bucket).
    assert decode_pending(2, held[2]["triggers"])[1] == [
        Trigger(2, T0 + 600, POST_CREATED, 70, 9, T0 + 600, "PHOTO")]
    assert held[2]["due"] == T0 + 1_800 and 4 not in held
    # 6 and 8 were claimed and never finished (their worker died): after the lease
    # they are handed out again, triggers intact.
    lost = queue.claim(shard, T0 + 500 + 10_000, limit=10)
    assert sorted(lost.refreshes.users) == [2, 6, 8]
    assert all(decode_pending(u, p)[1] for u, p in zip(lost.refreshes.users,
                                                       lost.refreshes.payloads))
    assert queue.stats()["leases_expired"] == 2


def test_a_deferred_user_keeps_its_triggers_and_wait(queue):
    shard = queue.shard_of(5)
    edge = Trigger(5, T0, FOLLOW_CHANGED, author_id=9)
    queue.add([edge], T0)
    claim = queue.claim(shard, T0 + 500, limit=10)
    queue.finish(shard, [], [(5, T0 + 2_500, f"{T0 + 500},1")], T0 + 500)
    assert queue.claim(shard, T0 + 2_000, limit=10).refreshes.users == []
    again = queue.claim(shard, T0 + 2_500, limit=10).refreshes
    assert again.users == [5] and again.waits == [f"{T0 + 500},1"]
    assert again.payloads == claim.refreshes.payloads
    queue.finish(shard, [(5, decode_pending(5, again.payloads[0])[0])], [], T0 + 2_600)
    assert queue.pending() == {}


def test_viral_levels_trigger_once_and_users_are_rate_limited(queue):
    assert queue.raise_levels([(70, 1), (71, 2)], ttl_ms=60_000) == [70, 71]
    assert queue.raise_levels([(70, 1), (71, 3)], ttl_ms=60_000) == [71]   # 70 already at 1
    assert queue.admit_viral([1, 2], interval_ms=60_000) == [1, 2]
    assert queue.admit_viral([2, 3], interval_ms=60_000) == [3]
