"""Applying post and follow events to the feed stores: the fan-out without Beam.

    fanout = FeedFanout.open(StoreConfig(), FanoutPolicy())
    outcomes = fanout.apply(events)        # Redis, then Cassandra; one outcome (or None) per event
    batch = fanout.apply_to_redis(events)  # Redis only; batch.writes for DurableFeedWriter
    fanout.close()

Decisions come from ``domain.fanout``. ``FeedFanout`` writes Redis a batch at a
time, a constant number of round trips per batch, in an order that makes
concurrent batches and replays converge, and returns the Cassandra writes it
decided (``schemas.fanout.DurableWrite``); ``DurableFeedWriter`` applies them,
in the same batch or later in a step of their own (docs/pipelines/fanout.md).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Sequence

from domain.fanout import (
    FanoutPolicy,
    active_users,
    is_active,
    is_push_author,
    latest_per_edge,
    live_entries,
    select_celebrity_targets,
)
from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind
from schemas.fanout import (
    CelebrityAdd,
    CelebrityRemove,
    DurableWrite,
    Edge,
    FanoutOutcome,
    FeedAdd,
    FeedRemove,
    FollowerCount,
    Post,
    PostTombstone,
    TimelineAdd,
    TimelineRemove,
)
from stores.cassandra.feeds import CassandraFeedStore
from stores.config import StoreConfig
from stores.redis.feeds import RedisFeedStore


@dataclasses.dataclass(frozen=True)
class FeedStores:
    """Open feed stores, Redis (hot) and Cassandra (durable); ``close()`` closes both."""

    redis: RedisFeedStore
    cassandra: CassandraFeedStore

    @classmethod
    def open(cls, config: StoreConfig) -> "FeedStores":
        """New clients of the stores ``config`` names."""
        redis = RedisFeedStore.from_url(config.redis_url, key_prefix=config.redis_key_prefix)
        try:
            cassandra = cls.open_cassandra(config)
        except Exception:
            redis.close()
            raise
        return cls(redis, cassandra)

    @staticmethod
    def open_cassandra(config: StoreConfig) -> CassandraFeedStore:
        """A new client of the Cassandra store ``config`` names (``close()`` it)."""
        return CassandraFeedStore.connect(config.cassandra_host, config.cassandra_port,
                                          config.cassandra_keyspace, **config.cassandra_options)

    def close(self) -> None:
        try:
            self.redis.close()
        finally:
            self.cassandra.close()


@dataclasses.dataclass
class FanoutBatch:
    """What applying a batch to Redis did: one outcome (or None) per event, in order,
    the Cassandra writes it decided, and the threshold crossings it carried out
    (account -> celebrity now?), to settle once the writes are durable
    (``FeedFanout.settle``)."""

    outcomes: list[FanoutOutcome | None]
    writes: list[DurableWrite] = dataclasses.field(default_factory=list)
    crossings: dict[int, bool] = dataclasses.field(default_factory=dict)


class FeedFanout:
    """Applies post and follow events to Redis, and their durable copy to Cassandra.

    ``redis`` follows ``RedisFeedStore``; ``cassandra`` a ``CassandraFeedStore``
    that ``apply`` writes each batch's durable copy to, or None when the caller
    ships ``apply_to_redis``'s writes itself. ``clock`` returns epoch seconds
    (freshness and the write time of removals and merges).
    """

    def __init__(self, redis, cassandra, policy: FanoutPolicy,
                 clock: Callable[[], float] = time.time):
        self.redis = redis
        self.cassandra = cassandra
        self.policy = policy
        self._clock = clock
        self._durable = None if cassandra is None else DurableFeedWriter(cassandra)
        self._owned: FeedStores | RedisFeedStore | None = None

    @classmethod
    def open(cls, config: StoreConfig, policy: FanoutPolicy,
             durable: bool = True) -> "FeedFanout":
        """A fan-out on new clients of the stores ``config`` names (Cassandra only if
        ``durable``); ``close()`` closes them."""
        if durable:
            stores = FeedStores.open(config)
            fanout = cls(stores.redis, stores.cassandra, policy)
            fanout._owned = stores
        else:
            redis = RedisFeedStore.from_url(config.redis_url, key_prefix=config.redis_key_prefix)
            fanout = cls(redis, None, policy)
            fanout._owned = redis
        return fanout

    def close(self) -> None:
        """Close the clients ``open()`` made (given ones are left open)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    def apply(self, events: Iterable[object]) -> list[FanoutOutcome | None]:
        """Apply ``events`` to Redis, then their durable copy to Cassandra (if this
        fan-out has it); one outcome per event, in order (see ``apply_to_redis``)."""
        batch = self.apply_to_redis(events)
        if self._durable is not None:
            self._durable.apply(batch.writes)
            self.settle(batch)
        return batch.outcomes

    def settle(self, batch: FanoutBatch) -> None:
        """Mark ``batch``'s threshold crossings done: call it once ``batch.writes`` are
        durable (in Cassandra or the durable log). Until then a crossing stays
        pending, and the replay of the batch after a crash carries it out again."""
        self.redis.settle_celebrities(batch.crossings)

    def apply_to_redis(self, events: Iterable[object]) -> FanoutBatch:
        """Apply ``events`` to Redis as one batch; returns the outcomes and the
        Cassandra writes decided.

        Follow events first, then creates, then deletes, each kind with a
        constant number of round trips: posts and follows come from different
        topics and no order between them is promised, and within a kind the
        order is kept where it matters (edge versions; a create after a delete
        of the same post in the batch is refused, as the tombstone would). A
        follow event superseded by a newer event of the same edge in the batch
        has no effect of its own: its outcome is None.
        """
        events = list(events)
        batch = FanoutBatch([None] * len(events))
        out = batch.outcomes
        follows: list[int] = []
        creates: list[int] = []
        deletes: list[int] = []
        deleted: set[int] = set()
        for i, e in enumerate(events):
            if isinstance(e, FollowEvent):
                follows.append(i)
            elif not isinstance(e, PostEvent):
                out[i] = FanoutOutcome(getattr(e, "event_id", ""), "ignored", 0)
            elif e.kind is PostEventKind.DELETED:
                deletes.append(i)
                deleted.add(e.post_id)
            elif e.post_id in deleted:
                out[i] = FanoutOutcome(e.event_id, "tombstoned", e.post_id,
                                       event_time=e.event_time)
            else:
                creates.append(i)
        for indices, step in ((follows, self._apply_follows), (creates, self._create_posts),
                              (deletes, self._delete_posts)):
            if indices:
                for i, outcome in zip(indices, step([events[i] for i in indices], batch)):
                    out[i] = outcome
        return batch

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _stamp(self, event_time: int) -> int:
        """Cassandra write time (ms) of feed removals, follow merges and followed-celebrity
        changes: now, or the event time if that is later (docs/pipelines/fanout.md,
        "Write times")."""
        return max(event_time, self._now_ms())

    # -- graph --------------------------------------------------------------------

    def _apply_follows(self, edges: Sequence[FollowEvent],
                       batch: FanoutBatch) -> list[FanoutOutcome | None]:
        p, redis, writes = self.policy, self.redis, batch.writes
        latest = latest_per_edge(edges)
        followers = list(dict.fromkeys(e.follower_id for e in latest
                                       if e.kind is FollowKind.FOLLOW))
        last_read = dict(zip(followers, redis.last_reads(followers)))
        active = [e.kind is FollowKind.FOLLOW
                  and is_active(last_read[e.follower_id], e.event_time, p.inactive_ms)
                  for e in latest]
        plans = [(p.follow_merge_limit if act else 0,
                  p.timeline_cap if e.kind is FollowKind.UNFOLLOW else 0)
                 for e, act in zip(latest, active)]
        states = redis.apply_followee_edges(latest, plans, p.push_threshold, p.push_chunk_size)

        count: dict[int, int] = {}
        crossed: dict[int, int] = {}  # followee -> a crossing pending? (nonzero)
        newest: dict[int, int] = {}
        for e, st in zip(latest, states):
            a = e.followee_id
            count[a] = st.followers  # the last one is the count after the whole batch
            crossed[a] = crossed.get(a, 0) or st.cross
            newest[a] = max(newest.get(a, e.event_time), e.event_time)
        celebrity = {a: not is_push_author(n, p) for a, n in count.items()}
        writes.extend(Edge(e.follower_id, e.followee_id, e.event_time,
                           e.kind is FollowKind.FOLLOW) for e in latest)
        # The count as of now, stamped with the newest event applied: an older
        # replay cannot overwrite a newer count.
        writes.extend(FollowerCount(a, n, newest[a]) for a, n in count.items())

        since = redis.apply_follower_edges(latest, [celebrity[e.followee_id] for e in latest],
                                           p.push_chunk_size)
        self._followed_celebrities(latest, since, celebrity, crossed, batch)

        outcome_of: dict[int, FanoutOutcome] = {}  # by id() of the edge's newest event
        merges, removals = [], []
        for e, st, act in zip(latest, states, active):
            if e.kind is FollowKind.FOLLOW and st.member:
                if act:
                    merges.append((e, st.entries))
                else:
                    outcome_of[id(e)] = FanoutOutcome(e.event_id, "skipped_inactive",
                                                      e.followee_id, skipped_inactive=1,
                                                      event_time=e.event_time)
            elif e.kind is FollowKind.UNFOLLOW and not st.member:
                removals.append((e, sorted(set(st.entries), key=lambda x: (-x[1], -x[0]))))
        for e, feeds in self._merge(merges, celebrity, writes):
            outcome_of[id(e)] = FanoutOutcome(e.event_id, "merge", e.followee_id, feeds=feeds,
                                              event_time=e.event_time)
        self._remove(removals, writes)
        for e, entries in removals:
            outcome_of[id(e)] = FanoutOutcome(e.event_id, "remove", e.followee_id,
                                              feeds=len(entries), event_time=e.event_time)
        for e in latest:
            outcome_of.setdefault(id(e), FanoutOutcome(e.event_id, "edge", e.followee_id,
                                                       event_time=e.event_time))
        return [outcome_of.pop(id(e), None) for e in edges]

    def _followed_celebrities(self, edges: Sequence[FollowEvent], since: Sequence[int | None],
                              celebrity: dict[int, bool], crossed: dict[int, int],
                              batch: FanoutBatch) -> None:
        """Keep the followed-celebrity sets: the edges' own entries were written with
        the edges; here an account with a pending threshold crossing is put into (or
        taken out of) every follower's set, the durable copy is recorded, and the
        flags are read again: a batch that flipped one meanwhile may have updated the
        sets before our writes landed, so any set written against a flag that has
        changed is redone from the flag as it is now."""
        stamp = self._now_ms()
        added: dict[int, list[tuple[int, int]]] = {}
        removed: dict[int, list[int]] = {}
        for e, followed_at in zip(edges, since):
            a = e.followee_id
            if followed_at is not None and celebrity[a]:
                added.setdefault(a, []).append((e.follower_id, followed_at))
            elif e.kind is FollowKind.UNFOLLOW:
                removed.setdefault(a, []).append(e.follower_id)
        batch.writes.extend(CelebrityAdd(tuple(pairs), a, stamp) for a, pairs in added.items())
        batch.writes.extend(CelebrityRemove(tuple(users), a, stamp)
                            for a, users in removed.items())
        changed = {a: celebrity[a] for a, cross in crossed.items() if cross}
        now = dict(zip(celebrity, self.redis.celebrities(list(celebrity))))
        changed.update((a, flag) for a, flag in now.items() if flag != celebrity[a])
        for a, flag in changed.items():
            self._set_celebrity_everywhere(a, flag, batch.writes)
        batch.crossings.update(changed)

    def _set_celebrity_everywhere(self, author: int, celebrity: bool,
                                  writes: list[DurableWrite]) -> None:
        """``author`` into (or out of) the followed celebrities of all its followers.
        The one step that reads a whole follower list, once per threshold crossing."""
        followers = self.redis.followers(author)
        since = self.redis.set_followed_celebrity(author, followers, celebrity)
        stamp = self._now_ms()
        if celebrity:
            writes.append(CelebrityAdd(tuple((u, s) for u, s in zip(followers, since)
                                             if s is not None), author, stamp))
        elif followers:
            writes.append(CelebrityRemove(tuple(followers), author, stamp))

    def _merge(self, merges: Sequence[tuple[FollowEvent, list[tuple[int, int]]]],
               celebrity: dict[int, bool], writes: list[DurableWrite]
               ) -> list[tuple[FollowEvent, int]]:
        """The followee's recent live posts into each new follower's feed, if the
        follower is among the followee's push targets; ``(event, posts merged)``."""
        p, redis = self.policy, self.redis
        n = p.celebrity_top_n
        celebs = list(dict.fromkeys(e.followee_id for e, _ in merges if celebrity[e.followee_id]))
        targets = {a: set(select_celebrity_targets(engaged, oldest, n))
                   for a, (engaged, oldest) in redis.celebrity_targets(celebs, n).items()}
        merges = [(e, entries) for e, entries in merges
                  if not celebrity[e.followee_id] or e.follower_id in targets[e.followee_id]]
        candidates = list(dict.fromkeys(pid for _, entries in merges for pid, _ in entries))
        deleted = dict(zip(candidates, redis.deleted(candidates)))
        live = [(e, live_entries(entries, [deleted[pid] for pid, _ in entries],
                                 p.follow_merge_limit) if entries else entries)
                for e, entries in merges]
        redis.merge_into_feeds([(e.follower_id, entries) for e, entries in live], p.feed_cap,
                               p.push_chunk_size)
        # Stamped "now": newer than the removal of an earlier unfollow.
        merged_at = max([self._now_ms(), *(e.event_time for e, _ in live)])
        writes.extend(_feed_adds(((e.follower_id, pid, e.followee_id, created)
                                  for e, entries in live for pid, created in entries), merged_at))
        # A delete that tombstoned one of them after our check may have cleaned
        # the feed before our write landed: take those out again.
        merged = list(dict.fromkeys(pid for _, entries in live for pid, _ in entries))
        gone = {pid for pid, d in zip(merged, redis.deleted(merged)) if d}
        if gone:
            again = [(e.follower_id, [(pid, c) for pid, c in entries if pid in gone])
                     for e, entries in live]
            redis.remove_entries([(u, [pid for pid, _ in es]) for u, es in again])
            removed_at = self._stamp(merged_at)
            writes.extend(_feed_removes(((u, pid, c) for u, es in again for pid, c in es),
                                        removed_at))
        return [(e, len(entries)) for e, entries in live]

    def _remove(self, removals: Sequence[tuple[FollowEvent, list[tuple[int, int]]]],
                writes: list[DurableWrite]) -> None:
        """The ex-followee's timeline posts (and those deleted from it) out of the feed."""
        self.redis.remove_entries([(e.follower_id, [pid for pid, _ in entries])
                                   for e, entries in removals])
        # Stamped "now": beats every push and merge of the edge it ended; a later
        # re-follow's merge, stamped later, beats it.
        removed_at = max([self._now_ms(), *(e.event_time for e, _ in removals)])
        writes.extend(_feed_removes(((e.follower_id, pid, created) for e, entries in removals
                                     for pid, created in entries), removed_at))

    # -- posts --------------------------------------------------------------------

    def _create_posts(self, posts: Sequence[PostEvent],
                      batch: FanoutBatch) -> list[FanoutOutcome]:
        """CREATED events: metadata, timelines, pushes, each step one round trip for
        the batch. The order of the steps is what closes the races with concurrent
        follows, unfollows and deletes (see the doc)."""
        p, redis, writes = self.policy, self.redis, batch.writes
        accepted = redis.put_posts(posts)
        live = [post for post, ok in zip(posts, accepted) if ok]
        writes.extend(Post(post.post_id, post.author_id, post.created_at, post.media_type.value,
                           post.caption_length, tuple(post.hashtags), post.event_time)
                      for post in live)
        writes.extend(TimelineAdd(post.author_id, post.post_id, post.created_at,
                                  post.media_type.value) for post in live)
        # The timeline first, the followers after, in one atomic step: a
        # concurrent FOLLOW (edge, then the timeline, atomically) sees this post
        # or is seen by this push.
        targets_of = redis.add_posts_to_timelines(
            [(post.author_id, post.post_id, post.created_at) for post in live],
            p.timeline_cap, p.push_threshold, p.celebrity_top_n, p.push_chunk_size)
        candidates_of = {
            a: t.followers if t.push else select_celebrity_targets(t.followers, t.oldest,
                                                                   p.celebrity_top_n)
            for a, t in targets_of.items()}
        users = list(set().union(*candidates_of.values()))
        last_read = dict(zip(users, redis.last_reads(users)))
        pushes = [active_users(candidates_of[post.author_id], last_read, post.event_time,
                               p.inactive_ms) for post in live]
        # An UNFOLLOW applied while we pushed may have cleaned its feed before
        # our write: whoever no longer follows loses the post again.
        gone = redis.push_posts([(post.author_id, targets, post.post_id, post.created_at)
                                 for targets, post in zip(pushes, live)],
                                p.feed_cap, p.push_chunk_size,
                                {a: t.unfollows for a, t in targets_of.items()})
        written_at_ms = self._now_ms()
        redis.remove_entries([(u, [post.post_id]) for users, post in zip(gone, live)
                              for u in users])
        for targets, post, left in zip(pushes, live, gone):
            at = max(post.created_at, post.event_time)
            if targets:
                writes.append(FeedAdd(tuple(targets), post.post_id, post.author_id,
                                      post.created_at, at))
            if left:
                writes.append(FeedRemove(tuple(left), post.post_id, post.created_at, at))
        outcomes = iter(zip(pushes, live))
        out = []
        for post, ok in zip(posts, accepted):
            if not ok:
                out.append(FanoutOutcome(post.event_id, "tombstoned", post.post_id,
                                         event_time=post.event_time))
                continue
            targets, _ = next(outcomes)
            push_mode = targets_of[post.author_id].push
            out.append(FanoutOutcome(
                post.event_id, "push" if push_mode else "celebrity", post.post_id,
                feeds=len(targets),
                skipped_inactive=len(candidates_of[post.author_id]) - len(targets),
                event_time=post.event_time, written_at_ms=written_at_ms))
        return out

    def _delete_posts(self, posts: Sequence[PostEvent],
                      batch: FanoutBatch) -> list[FanoutOutcome]:
        """DELETED events: tombstones, then off the timelines and out of every feed a
        push or merge could have reached (``FanoutPolicy.delete_scope``)."""
        p, redis, writes = self.policy, self.redis, batch.writes
        metas = redis.tombstone_posts(posts)
        writes.extend(PostTombstone(post.post_id, post.author_id, post.created_at,
                                    post.event_time) for post in posts)
        rows = [(meta["author_id"], post.post_id, meta["created_at"])
                for post, meta in zip(posts, metas)]
        reached = redis.remove_posts_from_timelines(rows, p.timeline_cap, p.delete_scope,
                                                    p.celebrity_top_n, p.push_chunk_size)
        redis.remove_entries([(u, [post.post_id]) for post, users in zip(posts, reached)
                              for u in users], p.push_chunk_size)
        out = []
        for post, (author, _, created_at), users in zip(posts, rows, reached):
            writes.append(TimelineRemove(author, post.post_id, created_at))
            if users:
                writes.append(FeedRemove(tuple(users), post.post_id, created_at,
                                         self._stamp(post.event_time)))
            out.append(FanoutOutcome(post.event_id, "delete", post.post_id, feeds=len(users),
                                     event_time=post.event_time))
        return out


def _feed_adds(rows: Iterable[tuple[int, int, int, int]], at_ms: int) -> list[FeedAdd]:
    """``FeedAdd`` records at ``at_ms`` of ``(user, post, author, created_at)`` rows, the
    users of one post together (one Cassandra statement per post and group of users)."""
    users: dict[tuple[int, int, int], list[int]] = {}
    for user, post_id, author, created_at in rows:
        users.setdefault((post_id, author, created_at), []).append(user)
    return [FeedAdd(tuple(us), post_id, author, created_at, at_ms)
            for (post_id, author, created_at), us in users.items()]


def _feed_removes(rows: Iterable[tuple[int, int, int]], at_ms: int) -> list[FeedRemove]:
    """``FeedRemove`` records at ``at_ms`` of ``(user, post, created_at)`` rows, the users
    of one post together."""
    users: dict[tuple[int, int], list[int]] = {}
    for user, post_id, created_at in rows:
        users.setdefault((post_id, created_at), []).append(user)
    return [FeedRemove(tuple(us), post_id, created_at, at_ms)
            for (post_id, created_at), us in users.items()]


class DurableFeedWriter:
    """Applies ``DurableWrite`` records to a ``CassandraFeedStore``: one concurrent
    execution per call (``CassandraFeedStore.deferred``). Every record carries its
    write time, so records apply in any order and any number of times alike."""

    def __init__(self, cassandra: CassandraFeedStore):
        self.cassandra = cassandra

    def apply(self, writes: Iterable[DurableWrite]) -> int:
        """Write ``writes``; returns how many records were applied. Of several follower
        counts of one user only the newest is written (the others would lose to it)."""
        c = self.cassandra
        n = 0
        edges = []
        counts: dict[int, FollowerCount] = {}
        with c.deferred():
            for w in writes:
                n += 1
                kind = type(w)
                if kind is Edge:
                    edges.append(w)
                elif kind is FollowerCount:
                    known = counts.get(w.user_id)
                    if known is None or w.at_ms >= known.at_ms:
                        counts[w.user_id] = w
                elif kind is FeedAdd:
                    c.push(w.user_ids, w.post_id, w.author_id, w.created_at, at_ms=w.at_ms)
                elif kind is FeedRemove:
                    c.remove_from_feeds(w.user_ids, w.post_id, w.created_at, at_ms=w.at_ms)
                elif kind is Post:
                    c.put_post(PostEvent("", w.event_time, PostEventKind.CREATED, w.post_id,
                                         w.author_id, w.created_at, MediaType(w.media_type),
                                         w.caption_length, w.hashtags))
                elif kind is PostTombstone:
                    c.tombstone_post(PostEvent("", w.event_time, PostEventKind.DELETED,
                                               w.post_id, w.author_id, w.created_at))
                elif kind is TimelineAdd:
                    c.add_to_timeline(w.author_id, w.post_id, w.created_at, w.media_type)
                elif kind is TimelineRemove:
                    c.remove_from_timeline(w.author_id, w.post_id, w.created_at)
                elif kind is CelebrityAdd:
                    c.set_followed_celebrity(w.followers, w.celebrity_id, w.at_ms)
                elif kind is CelebrityRemove:
                    c.remove_followed_celebrity(w.user_ids, w.celebrity_id, w.at_ms)
                else:
                    raise TypeError(f"not a durable write: {w!r}")
            c.write_edges(edges)
            c.set_follower_counts(counts.values())
        return n


def ensure_log_topics(client_config: dict, names: Sequence[str], like: Sequence[str] = (),
                      timeout_s: float = 30.0) -> list[str]:
    """Create those of the topics ``names`` that do not exist, with as many partitions
    as the most partitioned existing topic of ``like`` (else 3), and wait until the
    broker serves them; returns the names created. For the fan-out's durable log:
    topic auto-creation is off, and the job owns that topic."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({k: v for k, v in client_config.items()})
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    partitions = max([len(existing[t].partitions) for t in like if t in existing] or [3])
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions) for n in missing],
                                  operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        if all(n in topics and topics[n].partitions and all(
                p.leader >= 0 for p in topics[n].partitions.values()) for n in missing):
            return missing
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {missing} not served after {timeout_s:.0f}s")
        time.sleep(0.2)
