"""Applying post and follow events to the feed stores: the fan-out without Beam.

    fanout = FeedFanout.open(StoreConfig(), FanoutPolicy())
    outcomes = fanout.apply(events)  # one FanoutOutcome (or None) per event
    fanout.close()

Decisions come from ``domain.fanout``; this module orders the store calls so
that concurrent batches and replays converge (docs/pipelines/fanout.md says how).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Iterable, Sequence

from domain.fanout import (
    FanoutPolicy,
    active_users,
    chunks,
    edge_effect,
    is_active,
    is_push_author,
    latest_per_edge,
    live_entries,
    runs_by_type,
    select_celebrity_targets,
)
from schemas.events import FollowEvent, PostEvent, PostEventKind
from schemas.fanout import FanoutOutcome
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
            cassandra = CassandraFeedStore.connect(
                config.cassandra_host, config.cassandra_port, config.cassandra_keyspace)
        except Exception:
            redis.close()
            raise
        return cls(redis, cassandra)

    def close(self) -> None:
        try:
            self.redis.close()
        finally:
            self.cassandra.close()


class FeedFanout:
    """Applies post and follow events to Redis and Cassandra.

    ``redis`` and ``cassandra`` follow ``RedisFeedStore`` / ``CassandraFeedStore``;
    ``clock`` returns epoch seconds (freshness and removal stamps).
    """

    def __init__(self, redis, cassandra, policy: FanoutPolicy,
                 clock: Callable[[], float] = time.time):
        self.redis = redis
        self.cassandra = cassandra
        self.policy = policy
        self._clock = clock
        self._owned: FeedStores | None = None

    @classmethod
    def open(cls, config: StoreConfig, policy: FanoutPolicy) -> "FeedFanout":
        """A fan-out on new clients of the stores ``config`` names; ``close()`` closes them."""
        stores = FeedStores.open(config)
        fanout = cls(stores.redis, stores.cassandra, policy)
        fanout._owned = stores
        return fanout

    def close(self) -> None:
        """Close the clients ``open()`` made (given ones are left open)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    def apply(self, events: Iterable[object]) -> list[FanoutOutcome | None]:
        """Apply ``events`` in order; one outcome per event, in order.

        A follow event superseded by a newer event of the same edge in the same
        batch has no effect of its own: its outcome is None. The Cassandra
        writes of the whole batch are executed together before this returns.
        """
        with self.cassandra.deferred():
            return self._apply(events)

    def _apply(self, events: Iterable[object]) -> list[FanoutOutcome | None]:
        out: list[FanoutOutcome | None] = []
        for kind, run in runs_by_type(events):
            if kind is FollowEvent:
                out.extend(self.apply_follows(run))
            elif kind is PostEvent:
                for deleted, posts in itertools.groupby(
                        run, key=lambda p: p.kind is PostEventKind.DELETED):
                    if deleted:
                        out.extend(self._delete(p) for p in posts)
                    else:
                        out.extend(self.create_posts(list(posts)))
            else:
                out.extend(FanoutOutcome(getattr(e, "event_id", ""), "ignored", 0) for e in run)
        return out

    # -- graph --------------------------------------------------------------------

    def apply_follows(self, edges: Sequence[FollowEvent]) -> list[FanoutOutcome | None]:
        """Apply follow events as one batch; outcomes as ``apply`` gives them."""
        self.redis.apply_edges(edges)
        self.cassandra.apply_edges(edges)
        newest: dict[int, int] = {}
        for e in edges:
            newest[e.followee_id] = max(newest.get(e.followee_id, e.event_time), e.event_time)
        for followee, at_ms in newest.items():
            # The count as of now, stamped with the newest event applied: an
            # older replay cannot overwrite a newer count.
            self.cassandra.set_follower_count(followee, self.redis.follower_count(followee), at_ms)
        following: dict[int, set[int]] = {}
        outcome_of: dict[int, FanoutOutcome] = {}  # by id() of the edge's newest event
        for e in latest_per_edge(edges):
            if e.follower_id not in following:
                following[e.follower_id] = set(self.redis.following(e.follower_id))
            effect = edge_effect(e, e.followee_id in following[e.follower_id])
            if effect == "merge":
                outcome_of[id(e)] = self._merge(e)
            elif effect == "remove":
                outcome_of[id(e)] = self._remove(e)
            else:
                outcome_of[id(e)] = FanoutOutcome(e.event_id, "edge", e.followee_id,
                                                  event_time=e.event_time)
        return [outcome_of.pop(id(e), None) for e in edges]

    def _merge(self, e: FollowEvent) -> FanoutOutcome:
        user, author = e.follower_id, e.followee_id
        (last_read,) = self.redis.last_reads([user])
        if not is_active(last_read, e.event_time, self.policy.inactive_ms):
            return FanoutOutcome(e.event_id, "skipped_inactive", author, skipped_inactive=1,
                                 event_time=e.event_time)
        if user not in self._push_targets(author)[1]:
            return FanoutOutcome(e.event_id, "edge", author, event_time=e.event_time)
        entries = self.redis.timeline(author, self.policy.follow_merge_limit)
        live = live_entries(entries, self.redis.deleted([p for p, _ in entries]),
                            self.policy.follow_merge_limit)
        if live:
            self.redis.merge_into_feed(user, live, self.policy.feed_cap)
            # Stamped "now": newer than the removal of an earlier unfollow.
            merged_at = self._stamp(e.event_time)
            for post_id, created_at in live:
                self.cassandra.push([user], post_id, author, created_at, at_ms=merged_at)
            # A delete that tombstoned one of them after our check may have
            # cleaned this feed before our write landed: take those out again.
            now_deleted = self.redis.deleted([p for p, _ in live])
            gone = [(p, c) for (p, c), d in zip(live, now_deleted) if d]
            if gone:
                self.redis.remove_from_feeds([user], [p for p, _ in gone])
                for post_id, created_at in gone:
                    self.cassandra.remove_from_feeds([user], post_id, created_at,
                                                     at_ms=self._stamp(merged_at))
        return FanoutOutcome(e.event_id, "merge", author, feeds=len(live),
                             event_time=e.event_time)

    def _remove(self, e: FollowEvent) -> FanoutOutcome:
        user, author = e.follower_id, e.followee_id
        # Deleted posts too: a delete running beside this unfollow may have
        # missed this follower (read after the edge went) and taken the post
        # off the timeline before we read it.
        entries = self.redis.timeline_and_deleted(author, self.policy.timeline_cap)
        if entries:
            self.redis.remove_from_feeds([user], [p for p, _ in entries])
            # Stamped "now": beats every push and merge of the edge it ended; a
            # later re-follow's merge, stamped later, beats it.
            removed_at = self._stamp(e.event_time)
            for post_id, created_at in entries:
                self.cassandra.remove_from_feeds([user], post_id, created_at, at_ms=removed_at)
        return FanoutOutcome(e.event_id, "remove", author, feeds=len(entries),
                             event_time=e.event_time)

    def _stamp(self, event_time: int) -> int:
        """Cassandra write time (ms) of feed removals and follow merges: now, or the
        event time if that is later (docs/pipelines/fanout.md, "Write times")."""
        return max(event_time, int(self._clock() * 1000))

    # -- posts --------------------------------------------------------------------

    def _push_targets(self, author: int) -> tuple[bool, list[int]]:
        """(push mode?, candidate followers before the activity filter)."""
        return self._push_targets_of([author])[author]

    def _push_targets_of(self, authors: Sequence[int]) -> dict[int, tuple[bool, list[int]]]:
        """``_push_targets`` of many authors: two round trips for push authors,
        a few more per author at or above the threshold."""
        authors = list(dict.fromkeys(authors))
        counts = self.redis.follower_counts(authors)
        pushed = [a for a, c in zip(authors, counts) if is_push_author(c, self.policy)]
        out = {a: (True, f) for a, f in zip(pushed, self.redis.followers_many(pushed))}
        n = self.policy.celebrity_top_n
        for author in authors:
            if author not in out:
                out[author] = (False, select_celebrity_targets(
                    self.redis.top_followers(author, n), self._oldest_followers(author, n), n)
                    if n > 0 else [])
        return out

    def _oldest_followers(self, author: int, n: int) -> list[int]:
        return next(iter(self.redis.iter_followers(author, batch_size=n)), [])

    def apply_post(self, post: PostEvent) -> FanoutOutcome:
        if post.kind is PostEventKind.DELETED:
            return self._delete(post)
        return self.create_posts([post])[0]

    def create_posts(self, posts: Sequence[PostEvent]) -> list[FanoutOutcome]:
        """Apply CREATED events together, each step one Redis round trip for the
        whole batch; outcomes in order. The order of the steps is what closes the
        races with concurrent follows, unfollows and deletes (see the doc)."""
        p = self.policy
        accepted = self.redis.put_posts(posts)
        live = [post for post, ok in zip(posts, accepted) if ok]
        for post in live:
            self.cassandra.put_post(post)
        # The timeline first, the followers after: a concurrent FOLLOW (edge
        # first, timeline after) then sees this post or is seen by this push.
        self.redis.add_to_timelines(
            [(post.author_id, post.post_id, post.created_at) for post in live], p.timeline_cap)
        for post in live:
            self.cassandra.add_to_timeline(post.author_id, post.post_id, post.created_at,
                                           post.media_type.value)
        targets_of = self._push_targets_of([post.author_id for post in live])
        candidates = list(dict.fromkeys(
            u for _, users in targets_of.values() for u in users))
        last_read = dict(zip(candidates, self.redis.last_reads(candidates)))
        pushes = []
        for post in live:
            users = targets_of[post.author_id][1]
            pushes.append(active_users(users, [last_read[u] for u in users], post.event_time,
                                       p.inactive_ms))
        self.redis.push_posts([(targets, post.post_id, post.created_at)
                               for targets, post in zip(pushes, live)],
                              p.feed_cap, chunk_size=p.push_chunk_size)
        written_at_ms = int(self._clock() * 1000)
        for targets, post in zip(pushes, live):
            self.cassandra.push(targets, post.post_id, post.author_id, post.created_at,
                                at_ms=max(post.created_at, post.event_time))
        # An UNFOLLOW applied while we pushed may have cleaned its feed before
        # our write: whoever is no longer a target loses the post again.
        still_of = self._push_targets_of([post.author_id for post in live]) if live else {}
        for targets, post in zip(pushes, live):
            still = set(still_of[post.author_id][1])
            gone = [u for u in targets if u not in still]
            if gone:
                self.redis.remove_from_feeds(gone, [post.post_id])
                self.cassandra.remove_from_feeds(gone, post.post_id, post.created_at,
                                                 at_ms=max(post.created_at, post.event_time))
        outcomes = iter(zip(pushes, live))
        out = []
        for post, ok in zip(posts, accepted):
            if not ok:
                out.append(FanoutOutcome(post.event_id, "tombstoned", post.post_id,
                                         event_time=post.event_time))
                continue
            targets, _ = next(outcomes)
            push_mode, users = targets_of[post.author_id]
            out.append(FanoutOutcome(
                post.event_id, "push" if push_mode else "celebrity", post.post_id,
                feeds=len(targets), skipped_inactive=len(users) - len(targets),
                event_time=post.event_time, written_at_ms=written_at_ms))
        return out

    def _delete(self, post: PostEvent) -> FanoutOutcome:
        meta = self.redis.tombstone_post(post)
        self.cassandra.tombstone_post(post)
        author = meta["author_id"] if meta else post.author_id
        created_at = meta["created_at"] if meta else post.created_at
        self.redis.remove_from_timeline(author, [(post.post_id, created_at)],
                                        self.policy.timeline_cap)
        self.cassandra.remove_from_timeline(author, post.post_id, created_at)
        users = self._oldest_followers(author, self.policy.delete_scope)
        engaged = [u for u in self.redis.top_followers(author, self.policy.celebrity_top_n)
                   if u not in set(users)] if self.policy.celebrity_top_n else []
        users = users + engaged
        self.redis.remove_from_feeds(users, [post.post_id])
        removed_at = self._stamp(post.event_time)
        for chunk in chunks(users, self.policy.push_chunk_size):
            self.cassandra.remove_from_feeds(list(chunk), post.post_id, created_at,
                                             at_ms=removed_at)
        return FanoutOutcome(post.event_id, "delete", post.post_id, feeds=len(users),
                             event_time=post.event_time)
