"""fanout: new posts into followers' home feeds (hybrid push/pull), graph upkeep, deletes.

    python -m pipelines.fanout --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--push_threshold 10000 ...]

reads ``post-events`` and ``follow-events`` (``ReadEvents``) and applies each
bundle to Redis (``RedisFeedStore``, hot) and Cassandra (``CassandraFeedStore``,
durable) through ``FanOutToFollowerFeeds``:

* FOLLOW / UNFOLLOW: the edge in both stores (newer event time wins per edge),
  the durable follower count; then, if the edge is followed *after* applying
  (FOLLOW) the followee's newest ``follow_merge_limit`` live posts are merged
  into the follower's feed, and if it is not (UNFOLLOW) the followee's
  timeline posts leave it.
* post CREATED: metadata (refused if tombstoned, so a replay never resurrects
  a deleted post), the author's timeline (capped at ``timeline_cap``), then a
  push of the post id (score ``created_at``) to every active follower when the
  author has fewer than ``push_threshold`` followers, else to the author's top
  ``celebrity_top_n`` active followers only (the rest pull the timeline at
  read time). Redis feeds are capped at ``feed_cap``; Cassandra keeps
  ``home_feed_by_user`` rows per (user, week).
* post DELETED: tombstone, out of the timeline and out of every feed a push or
  merge could have reached (``FanoutPolicy.delete_scope``).

Bounded re-runs: ``--replay_ranges '{"post-events": {"0": [0, 500]}}'`` (or
``build(..., ranges=...)``) reads exactly those offsets once, in batch mode,
committing nothing; ``feedbeam replay TOPIC ... --pipeline fanout`` resolves a
time or offset range and passes it. Only the topics in the ranges are read.

Decisions live in ``domain.fanout``; this module orchestrates store
calls (``FeedFanout``) and adapts them to Beam.

Delivery, idempotency, ordering
-------------------------------
Everything is one stateless ParDo fused with the Kafka read: a bundle's events
are buffered and applied in ``finish_bundle`` (or every ``max_batch`` events),
before the source commits the bundle's offsets on finalization. A crash
replays at most the uncommitted bundles, and every write is idempotent (sorted
set adds, newer-wins edges, tombstones), so replays converge to the same state.
Feed effects of an edge event are derived from the edge's state after it was
applied, not from "did this event change it": a replayed UNFOLLOW whose edge
write survived the crash still cleans the feed.

Post and follow events travel on different topics, so they are applied in no
particular order relative to each other. The state converges anyway: a push
reads the followers when it runs, a FOLLOW merges the followee's recent posts
and an UNFOLLOW removes them. Races between bundles running concurrently:

* push vs FOLLOW of the same pair: the push writes the timeline *before*
  reading the followers, the follow writes the edge *before* reading the
  timeline, so at least one of them sees the other. Closed.
* push vs UNFOLLOW: the push may read the follower, the unfollow then clean the
  feed, and the push's write land after it. After writing, the push reads the
  followers again and takes the post back out of any target that left.
  Closed, at the cost of a second follower read per post.
* merge vs DELETE: a merge re-checks the merged posts' tombstones after writing
  and removes any that turned deleted meanwhile. Closed.
* DELETE vs UNFOLLOW: the delete may read the followers after the edge went
  and the unfollow read the timeline after the post left it, so neither
  cleans that feed. The delete moves the post to the author's deleted set in
  the same MULTI that takes it off the timeline, and the unfollow reads both
  in one MULTI, so it always sees the post. Closed (found by the Kafka-broker
  fault test, where both topics' backlogs are applied side by side).
* not closed: an unfollow cleans only what the followee's timeline still holds
  (the newest ``timeline_cap`` posts; with ``timeline_cap >= feed_cap`` an
  older post is trimmed out of an active follower's Redis feed already); a
  celebrity's delete cleans the current top N and oldest followers, so an
  ex-top-N follower under engagement ranking keeps a stale id. Serving hydrates
  ids from post metadata, which reads a tombstoned post as absent. And one
  Cassandra-only case described at ``FeedFanout._stamp``.

Inactive users: a follower whose last feed read is older than
``inactive_days`` before the post's event time gets no push (nor follow
merge); serving rebuilds the feed on the next read. Never-read users count as
active (``fanout_logic.is_active`` says why).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import sys
import time
from typing import Callable, Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.utils.windowed_value import WindowedValue

from domain.fanout import (
    FanoutPolicy,
    FreshnessHistogram,
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
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import ReadEvents
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import FollowEvent, PostEvent, PostEventKind


if __name__ == "__main__":
    # `python -m pipelines.fanout`: run the importable module, not this __main__
    # copy: Beam pickles transforms and coders by reference to their module, and
    # options classes defined a second time would clash.
    from pipelines.fanout import main

    sys.exit(main())

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.fanout"
DEFAULT_GROUP = "feedbeam-fanout"


# --------------------------------------------------------------------------- options


class FanoutOptions(PipelineOptions):
    """Options of the fan-out pipeline (Kafka settings are ``KafkaReadOptions``)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = FanoutPolicy()
        parser.add_argument("--push_threshold", type=int, default=d.push_threshold,
                            help="authors with at least this many followers are pulled at read "
                                 "time (timeline) instead of pushed to every follower")
        parser.add_argument("--feed_cap", type=int, default=d.feed_cap,
                            help="entries kept per Redis home feed (newest)")
        parser.add_argument("--celebrity_top_n", type=int, default=d.celebrity_top_n,
                            help="followers of an author above the threshold who still get a push")
        parser.add_argument("--inactive_days", type=float, default=d.inactive_days,
                            help="followers without a feed read for this long get no push")
        parser.add_argument("--follow_merge_limit", type=int, default=d.follow_merge_limit,
                            help="recent posts of the followee merged into a feed on a new follow")
        parser.add_argument("--timeline_cap", type=int, default=d.timeline_cap,
                            help="posts kept per author timeline in Redis (>= feed_cap so an "
                                 "unfollow can clean everything it pushed)")
        parser.add_argument("--push_chunk_size", type=int, default=d.push_chunk_size,
                            help="feeds per Redis pipeline / Cassandra batch of a push")
        parser.add_argument("--max_batch", type=int, default=500,
                            help="events buffered before they are applied within a bundle")
        parser.add_argument("--freshness_log_s", type=float, default=60.0,
                            help="period of the freshness p50/p99 log line")
        parser.add_argument("--redis_url", default="redis://127.0.0.1:6379/0")
        parser.add_argument("--redis_key_prefix", default="fb")
        parser.add_argument("--cassandra_host", default="127.0.0.1")
        parser.add_argument("--cassandra_port", type=int, default=9042)
        parser.add_argument("--cassandra_keyspace", default="feedbeam")
        parser.add_argument("--replay_ranges", default=None, metavar="JSON",
                            help="re-run over bounded offset ranges instead of following the "
                                 "topics: {\"<topic>\": {\"<partition>\": [start, stop]}} "
                                 "(stop exclusive, topic names with their prefix); the job "
                                 "runs in batch mode and commits no offsets "
                                 "(`feedbeam replay TOPIC ... --pipeline fanout` builds it)")

    def policy(self) -> FanoutPolicy:
        return FanoutPolicy(
            push_threshold=self.push_threshold, feed_cap=self.feed_cap,
            celebrity_top_n=self.celebrity_top_n, inactive_days=self.inactive_days,
            follow_merge_limit=self.follow_merge_limit, timeline_cap=self.timeline_cap,
            push_chunk_size=self.push_chunk_size)

    def stores(self) -> "StoreConfig":
        return StoreConfig(self.redis_url, self.redis_key_prefix, self.cassandra_host,
                           self.cassandra_port, self.cassandra_keyspace)

    def ranges(self) -> "dict[str, dict[int, tuple[int, int]]] | None":
        """``--replay_ranges`` parsed (``parse_replay_ranges``); None when not given."""
        return None if self.replay_ranges is None else parse_replay_ranges(self.replay_ranges)


def parse_replay_ranges(text: str) -> dict[str, dict[int, tuple[int, int]]]:
    """``{"topic": {"0": [start, stop]}}`` JSON -> ``{topic: {0: (start, stop)}}``.

    ``ValueError`` names what is wrong; an empty mapping is an error too (a
    bounded job over nothing is almost certainly a mistake in the caller).
    """
    import json

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--replay_ranges is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError("--replay_ranges must be a non-empty JSON object of topics")
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for topic, parts in raw.items():
        if not isinstance(parts, dict):
            raise ValueError(f"--replay_ranges[{topic!r}] must map partitions to [start, stop]")
        out[topic] = {}
        for partition, bounds in parts.items():
            try:
                start, stop = (int(b) for b in bounds)
                p = int(partition)
            except (TypeError, ValueError):
                raise ValueError(f"--replay_ranges[{topic!r}][{partition!r}] must be "
                                 f"[start, stop], got {bounds!r}") from None
            if p < 0 or start < 0 or stop < start:
                raise ValueError(f"--replay_ranges[{topic!r}][{partition!r}]: bad range "
                                 f"[{start}, {stop})")
            out[topic][p] = (start, stop)
    return out


# --------------------------------------------------------------------------- stores


@dataclasses.dataclass(frozen=True)
class Stores:
    """Open store clients: Redis (hot) and Cassandra (durable)."""

    redis: object
    cassandra: object

    def close(self) -> None:
        for store in (self.redis, self.cassandra):
            close = getattr(store, "close", None)
            if close is not None:
                close()


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the stores are; pickled into the DoFn instead of clients."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "fb"
    cassandra_host: str = "127.0.0.1"
    cassandra_port: int = 9042
    cassandra_keyspace: str = "feedbeam"

    def open(self) -> Stores:
        from stores.cassandra.feeds import CassandraFeedStore
        from stores.redis.feeds import RedisFeedStore

        redis_store = RedisFeedStore.from_url(self.redis_url, key_prefix=self.redis_key_prefix)
        try:
            cassandra_store = CassandraFeedStore.connect(
                self.cassandra_host, self.cassandra_port, self.cassandra_keyspace)
        except Exception:
            redis_store.close()
            raise
        return Stores(redis_store, cassandra_store)


# --------------------------------------------------------------------------- applying events


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutOutcome:
    """What applying one event did (the transform's output; counted, and asserted in tests).

    ``action``: ``push`` (post pushed to ``feeds`` feeds), ``celebrity`` (timeline
    + top N), ``tombstoned`` (a create of a deleted post: nothing written),
    ``delete``, ``merge``, ``remove`` (edge feed effects), ``edge`` (edge applied,
    no feed effect), ``skipped_inactive`` (a follow merge for an inactive user),
    ``ignored`` (not a post or follow event). ``written_at_ms`` is when the
    Redis feeds were written (pushes).
    """

    event_id: str
    action: str
    subject: int
    feeds: int = 0
    skipped_inactive: int = 0
    event_time: int = 0
    written_at_ms: int | None = None


class FeedFanout:
    """Applies post and follow events to the two stores (no Beam; the DoFn adapts it).

    ``redis`` and ``cassandra`` follow ``RedisFeedStore`` / ``CassandraFeedStore``.
    ``clock`` returns epoch seconds (freshness timestamps).
    """

    def __init__(self, redis, cassandra, policy: FanoutPolicy,
                 clock: Callable[[], float] = time.time):
        self.redis = redis
        self.cassandra = cassandra
        self.policy = policy
        self._clock = clock

    def apply(self, events: Iterable[object]) -> list[FanoutOutcome]:
        """Apply ``events`` in order (consecutive follow events as one batch).

        Redis is written event by event (its state drives the decisions);
        the Cassandra writes of the whole batch are held and executed
        together, packed into unlogged batches, when the batch is done
        (``CassandraFeedStore.deferred``): they carry their own timestamps,
        so their order does not matter, and the batch is complete in both
        stores before ``apply`` returns (before the source may commit).
        """
        deferred = getattr(self.cassandra, "deferred", None)
        with deferred() if deferred is not None else contextlib.nullcontext():
            return self._apply(events)

    def _apply(self, events: Iterable[object]) -> list[FanoutOutcome]:
        out: list[FanoutOutcome] = []
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

    def apply_follows(self, edges: Sequence[FollowEvent]) -> list[FanoutOutcome]:
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
        out = []
        for e in latest_per_edge(edges):
            if e.follower_id not in following:
                following[e.follower_id] = set(self.redis.following(e.follower_id))
            effect = edge_effect(e, e.followee_id in following[e.follower_id])
            if effect == "merge":
                out.append(self._merge(e))
            elif effect == "remove":
                out.append(self._remove(e))
            else:
                out.append(FanoutOutcome(e.event_id, "edge", e.followee_id,
                                         event_time=e.event_time))
        return out

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
        # off the timeline before we read it (timeline_deleted says more).
        entries = self.redis.timeline_and_deleted(author, self.policy.timeline_cap)
        if entries:
            self.redis.remove_from_feeds([user], [p for p, _ in entries])
            # Stamped "now": beats every push and merge of the edge it ended
            # (even of a post with a later event time, read from the other
            # topic first); a later re-follow's merge, stamped later, beats it.
            removed_at = self._stamp(e.event_time)
            for post_id, created_at in entries:
                self.cassandra.remove_from_feeds([user], post_id, created_at, at_ms=removed_at)
        return FanoutOutcome(e.event_id, "remove", author, feeds=len(entries),
                             event_time=e.event_time)

    def _stamp(self, event_time: int) -> int:
        """Cassandra write time (ms) of feed removals and follow merges: now.

        Pushes are stamped with the post's time; an unfollow's or a delete's
        removal must beat every push written before it, including one of a
        post with a later event time that was read first from the other
        topic, and a re-follow's merge must beat that removal. Processing
        time orders them (event times do not run ahead of the wall clock).
        A replay writes such a stamp only when the current state calls for it
        (edge effects follow the applied edge; deleted posts are never
        pushed), so replays still converge. Left open: a post pushed *after*
        an unfollow + re-follow of its author, with an event time before the
        unfollow's processing, loses to the removal in Cassandra (Redis has
        it); that needs the post topic to lag the follow topic by longer than
        the unfollow-to-re-follow gap.
        """
        return max(event_time, int(self._clock() * 1000))

    # -- posts --------------------------------------------------------------------

    def _push_targets(self, author: int) -> tuple[bool, list[int]]:
        """(push mode?, candidate followers before the activity filter)."""
        return self._push_targets_of([author])[author]

    def _push_targets_of(self, authors: Sequence[int]) -> dict[int, tuple[bool, list[int]]]:
        """``_push_targets`` of many authors: two round trips for push authors,
        a few more per author at or above the threshold (rare)."""
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
        """Apply CREATED events together: each step is one Redis round trip for the
        whole batch, not one per post (the pipeline's hot path). Outcomes in order.

        Steps, in the order the races above rely on: metadata (tombstoned
        posts stop here), timelines, then followers and their last reads,
        the pushes, and a second read of the followers to take the post back
        from anyone who left meanwhile.
        """
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


# --------------------------------------------------------------------------- Beam


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying a batch for (everything applied is idempotent)."""
    import redis
    from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable

    return (redis.ConnectionError, redis.TimeoutError, OperationTimedOut, ReadTimeout,
            WriteTimeout, Unavailable, NoHostAvailable)


class _ApplyFanoutFn(beam.DoFn):
    """Buffers a bundle's events and applies them with ``FeedFanout`` before it ends.

    Clients are built in ``setup()`` from ``StoreConfig`` (only configuration is
    pickled). A batch that fails with a transient store error is retried whole
    with exponential backoff (its writes are idempotent); after ``attempts`` the
    error fails the bundle, which the runner retries and the source re-reads.
    """

    def __init__(self, stores: StoreConfig, policy: FanoutPolicy, max_batch: int = 500,
                 freshness_log_s: float = 60.0, attempts: int = 4, backoff_s: float = 0.5):
        self._store_config = stores
        self._policy = policy
        self._max_batch = max_batch
        self._freshness_log_s = freshness_log_s
        self._attempts = attempts
        self._backoff_s = backoff_s

    def setup(self):
        self._stores = self._store_config.open()
        self._fanout = FeedFanout(self._stores.redis, self._stores.cassandra, self._policy)
        self._transient = _transient_errors()
        self._freshness = Metrics.distribution(NAMESPACE, "freshness_ms")
        self._counters = {}
        self._histogram = FreshnessHistogram(self._freshness_log_s, now_s=time.monotonic())

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(n)

    def start_bundle(self):
        self._pending: list[tuple[object, object, object]] = []

    def process(self, event, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        self._pending.append((event, timestamp, window))
        if len(self._pending) >= self._max_batch:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()
        self._maybe_log_freshness()

    def teardown(self):
        stores = getattr(self, "_stores", None)
        if stores is not None:
            stores.close()

    def _flush(self):
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        outcomes = self._apply_with_retries([e for e, _, _ in pending])
        for outcome, (_, timestamp, window) in zip(outcomes, pending):
            self._record(outcome)
            yield WindowedValue(outcome, timestamp, [window])

    def _apply_with_retries(self, events: list) -> list[FanoutOutcome]:
        for attempt in range(1, self._attempts + 1):
            try:
                outcomes = self._fanout.apply(events)
                self._count("batches")
                return outcomes
            except self._transient as exc:
                if attempt == self._attempts:
                    self._count("batch_failures")
                    raise
                self._count("batch_retries")
                delay = self._backoff_s * 2 ** (attempt - 1)
                log.warning("fanout: transient store error (attempt %d/%d), retrying the batch "
                            "of %d events in %.1fs: %s", attempt, self._attempts, len(events),
                            delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _record(self, o: FanoutOutcome) -> None:
        self._count(f"events_{o.action}")
        self._count("skipped_inactive", o.skipped_inactive)
        if o.action in ("push", "celebrity"):
            self._count("feed_inserts", o.feeds)
            freshness = o.written_at_ms - o.event_time
            self._freshness.update(freshness)
            self._histogram.add(freshness)
        elif o.action == "delete":
            self._count("delete_feed_removals", o.feeds)
        elif o.action == "merge":
            self._count("merged_posts", o.feeds)
        elif o.action == "remove":
            self._count("unfollow_removals", o.feeds)

    def _maybe_log_freshness(self) -> None:
        now = time.monotonic()
        if self._histogram.due(now):
            summary = self._histogram.flush(now)
            if summary:
                count, p50, p99 = summary
                log.info("fanout freshness over the last %.0fs: %d posts pushed, p50 %.0f ms, "
                         "p99 %.0f ms", self._freshness_log_s, count, p50, p99)


class FanOutToFollowerFeeds(beam.PTransform):
    """Apply post and follow events to the feed stores (hybrid push/pull fan-out).

    Args:
      stores: where Redis and Cassandra are (``StoreConfig``, or any object whose
        ``open()`` returns ``Stores``; tests pass in-memory ones).
      policy: ``FanoutPolicy`` (threshold, caps, top N, inactivity, merge limit).
      max_batch: events applied at once within a bundle.
      freshness_log_s: period of the freshness log line.

    Takes a ``PCollection`` of events (``PostEvent`` and ``FollowEvent``; others
    are ignored and counted). Returns a ``PCollection[FanoutOutcome]``, one per
    event, emitted once the event's writes are done. Keep it fused with the
    read (no GroupByKey before it): the source commits offsets only after the
    bundle that applied them ends.
    """

    def __init__(self, stores: StoreConfig, policy: FanoutPolicy, max_batch: int = 500,
                 freshness_log_s: float = 60.0):
        super().__init__()
        self._stores = stores
        self._policy = policy
        self._max_batch = max_batch
        self._freshness_log_s = freshness_log_s

    def expand(self, events):
        return (events
                | "ApplyToStores" >> beam.ParDo(_ApplyFanoutFn(
                    self._stores, self._policy, self._max_batch, self._freshness_log_s))
                .with_output_types(FanoutOutcome))


def build(pipeline: beam.Pipeline, options: PipelineOptions,
          ranges: "dict[str, dict[int, tuple[int, int]]] | None" = None):
    """Wire the fan-out job into ``pipeline``; returns the outcomes PCollection.

    Without ``ranges`` (and without ``--replay_ranges``) the job follows
    ``post-events`` and ``follow-events`` from the consumer group's offsets:
    the streaming job. With ``ranges`` (``{topic: {partition: (start, stop)}}``,
    as ``stores.kafka.offsets`` resolves them; ``ranges`` wins over the option)
    it reads exactly those offsets once, a bounded re-run whose effects are the
    same idempotent writes; topics not in ``ranges`` are not read at all.
    """
    kafka = options.view_as(KafkaReadOptions)
    fanout = options.view_as(FanoutOptions)
    config = kafka.source_config(default_group=DEFAULT_GROUP)
    prefix = kafka.topic_prefix
    if ranges is None:
        ranges = fanout.ranges()
    if ranges is not None:
        read = ReadEvents(config, ranges=ranges, topic_prefix=prefix)
    else:
        read = ReadEvents(config, [prefix + PostEvent.TOPIC, prefix + FollowEvent.TOPIC],
                          topic_prefix=prefix)
    return (pipeline
            | "ReadPostAndFollowEvents" >> read
            | "FanOutToFollowerFeeds" >> FanOutToFollowerFeeds(
                fanout.stores(), fanout.policy(), fanout.max_batch, fanout.freshness_log_s))


def run(argv=None):
    """Parse options, build the pipeline and run it until it ends or is cancelled
    (SIGTERM or Ctrl-C cancel the job on the runner, see ``pipelines.runtime``).

    Streaming unless ``--replay_ranges`` is given; then a batch job over those
    ranges that ends when they are read (``feedbeam replay --pipeline fanout``).
    """
    options = pipeline_options(argv)
    bounded = options.view_as(FanoutOptions).ranges() is not None
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)


def main(argv=None) -> int:
    """``python -m pipelines.fanout``: log at INFO, run until the job ends or is cancelled."""
    # force: importing Beam already configured the root logger (at WARNING),
    # which would silence the freshness lines.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    run(sys.argv[1:] if argv is None else argv)
    return 0
