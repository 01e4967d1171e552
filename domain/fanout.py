"""The fan-out pipeline's decisions as plain functions (no Beam, no stores).

``pipelines.fanout`` adapts these: whom a post is pushed to (push below the
follower threshold, author timeline + top-N above it), who counts as active,
how pushes are chunked, what a follow edge event does to feeds, the freshness
histogram, and ``expected_state``: the oracle the integration tests compare the
materialized Redis and Cassandra state with. The rules and why:
docs/architecture.md, "Decision rules", and docs/pipelines/fanout.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Mapping, Sequence, TypeVar

from schemas.events import FollowEvent, FollowKind, PostEvent, PostEventKind

T = TypeVar("T")

DAY_MS = 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True)
class FanoutPolicy:
    """The knobs of fan-out (``FanoutOptions`` builds one)."""

    push_threshold: int = 10_000
    feed_cap: int = 1_000
    celebrity_top_n: int = 100
    inactive_days: float = 30.0
    follow_merge_limit: int = 50
    timeline_cap: int = 1_000
    push_chunk_size: int = 1_000

    def __post_init__(self):
        for name in ("push_threshold", "feed_cap", "timeline_cap", "push_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("celebrity_top_n", "follow_merge_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.inactive_days <= 0:
            raise ValueError("inactive_days must be > 0")

    @property
    def inactive_ms(self) -> int:
        return int(self.inactive_days * DAY_MS)

    @property
    def delete_scope(self) -> int:
        """How many of an author's oldest followers a delete cleans.

        With follower-order top N, a follower's rank only improves while the
        edge lasts (new follows join at the end), so everyone a push or a
        follow merge could have reached and who still follows is among the
        oldest ``max(push_threshold, celebrity_top_n)``: below the threshold
        that is every follower; above it, it includes the top N. (Unfollowers
        were cleaned by their unfollow.) The delete also cleans the current
        engagement-ranked top N; a follower who dropped out of that ranking
        keeps a stale id (serving drops tombstoned ids when hydrating).
        """
        return max(self.push_threshold, self.celebrity_top_n)


# --------------------------------------------------------------------------- push / pull


def is_push_author(follower_count: int, policy: FanoutPolicy) -> bool:
    """True if the author's posts are pushed to all followers (below the threshold)."""
    return follower_count < policy.push_threshold


def select_celebrity_targets(most_engaged: Sequence[int], oldest: Sequence[int],
                             top_n: int) -> list[int]:
    """The followers of an at-threshold author who still get a push (at most ``top_n``).

    ``most_engaged``: followers ranked by engagement with the author (the
    features store's ranking, via ``RedisFeedStore.top_followers``; empty until
    the features pipeline records it). ``oldest``: followers in follow order.
    The engaged come first; the rest of the N are filled by follow order, which
    is all there is today. This is the one place to change the choice.
    """
    if top_n <= 0:
        return []
    out: list[int] = []
    seen: set[int] = set()
    for u in list(most_engaged) + list(oldest):
        if u not in seen:
            seen.add(u)
            out.append(u)
            if len(out) >= top_n:
                break
    return out


def is_active(last_read_ms: int | None, at_ms: int, inactive_ms: int) -> bool:
    """Whether a user counts as active for something that happened at ``at_ms``.

    Never read (None) counts as active: without an account-age signal a user
    who has not read yet is most likely new, and a new user's first read must
    find a feed. Once serving records reads, a user idle for ``inactive_ms``
    stops getting pushes and has the feed rebuilt on the next read.
    """
    return last_read_ms is None or last_read_ms >= at_ms - inactive_ms


def active_users(user_ids: Sequence[int], last_read: Mapping[int, int | None], at_ms: int,
                 inactive_ms: int) -> list[int]:
    """``user_ids`` (order kept) that are active at ``at_ms``; ``last_read`` has each
    one's last read (None: never). A user missing from it is a ``KeyError``."""
    since = at_ms - inactive_ms  # is_active, inlined: this runs once per follower of a post
    return [u for u in user_ids if (last := last_read[u]) is None or last >= since]


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (none for an empty input)."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def runs_by_type(events: Iterable[T]) -> Iterator[tuple[type, list[T]]]:
    """Consecutive events of one type, in order: ``(type, [events])``.

    A bundle is applied run by run: follow edges of a run in one batch, and
    the relative order of follows and posts read from one partition is kept.
    """
    current: list[T] = []
    kind: type | None = None
    for event in events:
        if type(event) is not kind and current:
            yield kind, current
            current = []
        kind = type(event)
        current.append(event)
    if current:
        yield kind, current


def latest_per_edge(edges: Iterable[FollowEvent]) -> list[FollowEvent]:
    """The newest event of each (follower, followee) pair, in first-seen order.

    Ties on event time go to UNFOLLOW, as in the stores; a later duplicate of
    the same version keeps the first.
    """
    best: dict[tuple[int, int], FollowEvent] = {}
    for e in edges:
        pair = (e.follower_id, e.followee_id)
        if pair not in best or edge_order(e) > edge_order(best[pair]):
            best[pair] = e
    return list(best.values())


def edge_order(e: FollowEvent) -> tuple:
    """Sort key of edge events: event time, then UNFOLLOW over FOLLOW at equal times.

    The stores' "newer wins" order (``redis_store.edge_version``, and a
    Cassandra tombstone beating a write of the same timestamp).
    """
    return (e.event_time, e.kind is FollowKind.UNFOLLOW)


def edge_effect(event: FollowEvent, following_now: bool) -> str | None:
    """What an applied edge event does to the follower's feed.

    Decided from the edge's state *after* the event was applied, not from
    whether this event changed it: an event replayed after a crash (edge
    already applied, feed step lost) still does its feed step, and an older
    event that lost to a newer one does nothing. Returns ``"merge"``,
    ``"remove"`` or None.
    """
    if event.kind is FollowKind.FOLLOW and following_now:
        return "merge"
    if event.kind is FollowKind.UNFOLLOW and not following_now:
        return "remove"
    return None


def live_entries(entries: Sequence[tuple[int, float]], deleted: Sequence[bool],
                 limit: int) -> list[tuple[int, int]]:
    """Timeline entries ``(post_id, score)`` that are not deleted, newest ``limit``."""
    live = [(int(p), int(s)) for (p, s), gone in zip(entries, deleted) if not gone]
    live.sort(key=lambda e: (-e[1], -e[0]))
    return live[:limit]


# --------------------------------------------------------------------------- freshness


class FreshnessHistogram:
    """Log-bucketed latency histogram (~2 % resolution) flushed by wall clock.

    ``add(ms)`` records one sample; ``due(now_s)`` says a period has passed
    since the last flush; ``flush(now_s)`` returns ``(count, p50, p99)`` of the
    samples since then (None if there were none) and starts a new period.
    """

    _BASE = 1.02

    def __init__(self, period_s: float = 60.0, now_s: float = 0.0):
        self.period_s = period_s
        self._started = now_s
        self._counts: dict[int, int] = {}
        self._n = 0

    def _bucket(self, ms: float) -> int:
        return -1 if ms < 1 else int(math.log(ms) / math.log(self._BASE))

    def _value(self, bucket: int) -> float:
        return 0.0 if bucket < 0 else self._BASE ** (bucket + 1)  # upper bound

    def add(self, ms: float) -> None:
        b = self._bucket(max(ms, 0.0))
        self._counts[b] = self._counts.get(b, 0) + 1
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def quantile(self, q: float) -> float | None:
        if not self._n:
            return None
        rank = max(1, math.ceil(q * self._n))
        seen = 0
        for b in sorted(self._counts):
            seen += self._counts[b]
            if seen >= rank:
                return self._value(b)
        return self._value(max(self._counts))

    def due(self, now_s: float) -> bool:
        return now_s - self._started >= self.period_s

    def flush(self, now_s: float) -> tuple[int, float, float] | None:
        summary = None
        if self._n:
            summary = (self._n, self.quantile(0.5), self.quantile(0.99))
        self._counts = {}
        self._n = 0
        self._started = now_s
        return summary


# --------------------------------------------------------------------------- oracle


@dataclasses.dataclass(frozen=True)
class ExpectedState:
    """What the stores should hold after a set of events (see ``expected_state``)."""

    followers: dict[int, list[int]]            # user -> followers, oldest follow first
    feeds: dict[int, list[tuple[int, int]]]    # Redis home feed: (post_id, created_at), newest first, capped
    durable_feeds: dict[int, set[int]]         # Cassandra home feed: post ids (uncapped)
    timelines: dict[int, list[tuple[int, int]]]  # author -> (post_id, created_at), newest first, capped
    deleted: set[int]
    # user -> the followed accounts at or above the push threshold
    followed_celebrities: dict[int, set[int]] = dataclasses.field(default_factory=dict)


def expected_state(events: Iterable[PostEvent | FollowEvent], policy: FanoutPolicy,
                   last_reads: Mapping[int, int | None] | None = None) -> ExpectedState:
    """The converged state of fan-out over ``events``, whatever order they were applied in.

    Closed form, valid when the order cannot matter: the graph (who follows
    whom, who is above the threshold, who is in a top N) and activity are
    the same for every post; an author has at most ``follow_merge_limit``
    live posts (so a follow merge brings all of them, as a push would have);
    and no delete lands in a feed already trimmed to ``feed_cap``. The tests
    build workloads that satisfy this; outside it the order of processing
    legitimately changes the result (that is the point of the caps).
    """
    last_reads = dict(last_reads or {})
    edges: dict[tuple[int, int], FollowEvent] = {}
    created: dict[int, PostEvent] = {}
    deleted: set[int] = set()
    for e in events:
        if isinstance(e, FollowEvent):
            pair = (e.follower_id, e.followee_id)
            if pair not in edges or edge_order(e) > edge_order(edges[pair]):
                edges[pair] = e
        elif e.kind is PostEventKind.DELETED:
            deleted.add(e.post_id)
        else:
            created.setdefault(e.post_id, e)

    followers: dict[int, list[tuple[tuple, int]]] = {}
    for (follower, followee), e in edges.items():
        if e.kind is FollowKind.FOLLOW:
            # Redis orders equal scores by member string.
            followers.setdefault(followee, []).append(((e.event_time, str(follower)), follower))
    ordered = {a: [u for _, u in sorted(fs)] for a, fs in followers.items()}

    live_by_author: dict[int, list[PostEvent]] = {}
    for p in created.values():
        if p.post_id not in deleted:
            live_by_author.setdefault(p.author_id, []).append(p)
    for posts in live_by_author.values():
        posts.sort(key=lambda p: (-p.created_at, -p.post_id))

    feeds: dict[int, set[tuple[int, int]]] = {}
    for author, posts in live_by_author.items():
        fs = ordered.get(author, [])
        targets = fs if is_push_author(len(fs), policy) else select_celebrity_targets(
            (), fs, policy.celebrity_top_n)
        for p in posts:
            for u in targets:
                if is_active(last_reads.get(u), p.event_time, policy.inactive_ms):
                    feeds.setdefault(u, set()).add((p.post_id, p.created_at))

    def newest(entries, cap):
        return sorted(entries, key=lambda e: (-e[1], -e[0]))[:cap]

    celebrities: dict[int, set[int]] = {}
    for author, fs in ordered.items():
        if not is_push_author(len(fs), policy):
            for u in fs:
                celebrities.setdefault(u, set()).add(author)

    return ExpectedState(
        followers=ordered,
        feeds={u: newest(es, policy.feed_cap) for u, es in feeds.items()},
        durable_feeds={u: {p for p, _ in es} for u, es in feeds.items()},
        timelines={a: newest([(p.post_id, p.created_at) for p in ps], policy.timeline_cap)
                   for a, ps in live_by_author.items()},
        deleted=deleted,
        followed_celebrities=celebrities,
    )


def percentile_of(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (tests, benchmarks)."""
    if not sorted_values:
        raise ValueError("no values")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]

