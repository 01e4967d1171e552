"""The ranking pipeline's decisions as plain functions (no Beam, no stores).

``pipelines.ranking`` and ``stores.ranker`` adapt these: triggers
(``engagement_trigger``, ``follow_trigger``, ``post_audience`` and
``post_triggers``, ``viral_level``; folded per user by ``requests_from``), the
follow gate (``edges_not_applied``, ``follow_gate``), the per-user
``Debounce``, candidates (``merge_candidates`` for one user,
``select_candidates`` for a batch), ``recency_scores`` (the ranking without a
model) and ``diversify``. What each decides: docs/architecture.md, "Decision
rules", and docs/pipelines/ranking.md.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from typing import Iterable, Mapping, Protocol, Sequence, TypeVar

import numpy as np

from domain.fanout import DAY_MS, is_active
from schemas.events import EngagementEvent, FollowEvent, FollowKind, PostEvent, PostEventKind
from schemas.features import ENGAGING_KINDS
from schemas.ranking import (
    ENGAGED,
    FOLLOW_CHANGED,
    POST_CREATED,
    POST_DELETED,
    UNFOLLOW_CHANGED,
    VIRAL,
    Candidate,
    CandidateColumns,
    PostTable,
    RefreshRequest,
    Trigger,
)


@dataclasses.dataclass(frozen=True)
class RankingPolicy:
    """The knobs of ranking (``RankingOptions`` builds one)."""

    max_candidates: int = 200
    pushed_limit: int = 400
    celebrity_posts: int = 50
    max_age_days: float = 7.0
    push_threshold: int = 10_000
    inactive_days: float = 30.0
    top_k: int = 20
    max_per_author: int = 3
    no_adjacent: bool = True
    #: Users a post (or its jump in engagement) refreshes eagerly (``post_audience``).
    post_refresh_cap: int = 1000
    #: A new post ranked before the fan-out stored it stays a candidate of that user's
    #: next rankings until this long after its creation (``CandidateReader``); 0: off.
    carry_unstored_ms: int = 60_000

    def __post_init__(self):
        for name in ("max_candidates", "pushed_limit", "push_threshold", "top_k",
                     "max_per_author"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.celebrity_posts < 0 or self.post_refresh_cap < 0 or self.carry_unstored_ms < 0:
            raise ValueError("celebrity_posts, post_refresh_cap and carry_unstored_ms must "
                             "be >= 0")
        if self.max_age_days <= 0 or self.inactive_days <= 0:
            raise ValueError("max_age_days and inactive_days must be > 0")

    @property
    def max_age_ms(self) -> int:
        return int(self.max_age_days * DAY_MS)

    @property
    def inactive_ms(self) -> int:
        return int(self.inactive_days * DAY_MS)


# --------------------------------------------------------------------------- triggers



def engagement_trigger(e: EngagementEvent) -> Trigger | None:
    """A like, comment, share or save moves the viewer's affinities: refresh the viewer.

    Views (the bulk of the traffic, with a small weight in the affinities),
    unlikes and profile views do not trigger; their effect is picked up by
    the viewer's next refresh.
    """
    if e.kind not in ENGAGING_KINDS:
        return None
    return Trigger(e.viewer_id, e.event_time, ENGAGED)


def follow_trigger(e: FollowEvent) -> Trigger:
    """A follow or unfollow changes the follower's candidates (``author_id``: the followee)."""
    reason = UNFOLLOW_CHANGED if e.kind is FollowKind.UNFOLLOW else FOLLOW_CHANGED
    return Trigger(e.follower_id, e.event_time, reason, author_id=e.followee_id)


def edge_versions_wanted(triggers: Iterable[Trigger]) -> dict[int, int]:
    """``followee -> edge version`` of the newest follow/unfollow trigger per followee.

    Versions order one edge's events as the fan-out's graph does
    (``stores.redis.feeds.edge_version``): later event time wins, and
    at equal times an unfollow beats a follow.
    """
    wanted: dict[int, int] = {}
    for t in triggers:
        if t.reason == FOLLOW_CHANGED or t.reason == UNFOLLOW_CHANGED:
            version = t.event_time * 2 + (1 if t.reason == UNFOLLOW_CHANGED else 0)
            if version > wanted.get(t.author_id, -1):
                wanted[t.author_id] = version
    return wanted


def edges_not_applied(wanted: Mapping[int, int],
                      stored: Mapping[int, int | None]) -> list[int]:
    """The followees of ``wanted`` whose edge the graph has not caught up with: no
    stored version, or an older one. A stored version newer than wanted means a
    later event of the edge was applied: caught up too (a replayed old edge)."""
    return sorted(f for f, v in wanted.items() if (stored.get(f) or -1) < v)


@dataclasses.dataclass(frozen=True)
class FollowWait:
    """How a refresh with follow triggers waits for the fan-out (see ``follow_gate``).

    The ranking reads candidates the fan-out writes (a follow merges the
    followee's recent posts into the follower's feed; later posts are pushed
    only to followers the graph holds). A refresh that ran before the fan-out
    applied the follow would rank without those posts, and nothing would
    refresh the user again until their next change. So such a refresh is put
    off until the graph holds the edge (then ``retry_ms`` more, for the merge
    that follows the edge), for at most ``max_wait_ms`` of wall-clock time.
    Checks back off from ``retry_ms``, doubling up to ``max_retry_ms``
    (``retry_delay``): with event-time timers a backlog moves the watermark
    far faster than the wall clock, and a fixed event-time retry would fire
    each waiting user's timer many times a second.
    """

    retry_ms: int = 2_000
    max_retry_ms: int = 60_000
    max_wait_ms: int = 1_800_000

    def __post_init__(self):
        if self.retry_ms < 1 or self.max_retry_ms < self.retry_ms or self.max_wait_ms < 0:
            raise ValueError("need 1 <= retry_ms <= max_retry_ms and max_wait_ms >= 0")

    def retry_delay(self, waits: int) -> int:
        """The delay before the next check after ``waits`` checks found the edges missing."""
        return min(self.max_retry_ms, self.retry_ms << min(max(waits - 1, 0), 30))


WAIT, SETTLE, GO, GIVE_UP = "wait", "settle", "go", "give_up"


def follow_gate(wait: FollowWait, unapplied: Sequence[int], waiting_since_ms: int | None,
                now_ms: int) -> str:
    """What a due refresh does about follow edges the fan-out may not have applied.

    ``unapplied``: followees from ``edges_not_applied``; ``waiting_since_ms``:
    wall time the refresh first waited (None if it has not). Returns ``GO``
    (refresh now), ``WAIT`` (retry in ``retry_ms``), ``SETTLE`` (the edges just
    arrived after a wait: one more ``retry_ms`` for the merge) or ``GIVE_UP``
    (waited ``max_wait_ms``: refresh anyway).
    """
    if not unapplied:
        return GO if waiting_since_ms is None else SETTLE
    if waiting_since_ms is not None and now_ms - waiting_since_ms >= wait.max_wait_ms:
        return GIVE_UP
    return WAIT


def post_audience(follower_count: int, followers: Sequence[int],
                  last_reads: Sequence[int | None], at_ms: int, policy: RankingPolicy
                  ) -> list[int]:
    """The users a post (or its jump in engagement) refreshes eagerly: at most
    ``policy.post_refresh_cap`` of them, whatever the author's size.

    ``followers``: below the push threshold, every follower of the author
    (bounded by the threshold); at or above it, the author's most engaged
    followers who still follow, most engaged first (never the whole follower
    set: that is the unbounded read this avoids). ``last_reads`` is aligned.
    Inactive users (no feed read within ``inactive_ms`` of ``at_ms``) are
    skipped, as by the fan-out; never-read users count as active. When more
    are left than the cap, the ones who will see the post soonest are kept:
    the most engaged above the threshold (the order given), the most recent
    readers below it (never-read users last). The others see the post at read
    time (serving puts posts newer than a ranking on top) and in their next
    refresh.
    """
    cap = policy.post_refresh_cap
    active = [(u, last) for u, last in zip(followers, last_reads)
              if is_active(last, at_ms, policy.inactive_ms)]
    if len(active) > cap and follower_count < policy.push_threshold:
        # Stable: equal read times keep follow order.
        active.sort(key=lambda ul: -1 if ul[1] is None else ul[1], reverse=True)
    return [u for u, _ in active[:cap]]


def post_triggers(post: PostEvent, audience: Sequence[int]) -> list[Trigger]:
    """A created or deleted post changes the candidates of its ``audience``
    (``post_audience``)."""
    reason = POST_DELETED if post.kind is PostEventKind.DELETED else POST_CREATED
    media = post.media_type.value if post.media_type is not None else ""
    return [Trigger(u, post.event_time, reason, post.post_id, post.author_id, post.created_at,
                    media)
            for u in audience]


@dataclasses.dataclass(frozen=True)
class ViralPolicy:
    """When a post's jump in engagement re-ranks the feeds that hold it.

    A post's level is 0 below ``min_engagements`` engagements (likes net of
    unlikes, comments, shares, saves) in the features pipeline's last hour,
    then 1, 2, 3 ... each time that count grows by ``factor``. Each level a
    post reaches re-ranks its audience (``post_audience``) once; a user is
    re-ranked for that reason at most once per ``user_interval_ms``.
    ``min_engagements=0`` turns it off.
    """

    min_engagements: int = 50
    factor: float = 2.0
    user_interval_ms: int = 600_000

    def __post_init__(self):
        if self.min_engagements < 0 or self.factor <= 1 or self.user_interval_ms < 0:
            raise ValueError("need min_engagements >= 0, factor > 1, user_interval_ms >= 0")

    @property
    def enabled(self) -> bool:
        return self.min_engagements > 0


#: The post features whose sum is a post's engagement count over the last hour.
VIRAL_FEATURES: tuple[str, ...] = ("like_1h", "comment_1h", "share_1h", "save_1h")


def viral_level(post_features: Mapping[str, float], policy: ViralPolicy) -> int:
    """The post's engagement level (see ``ViralPolicy``) from its online features."""
    if not policy.enabled:
        return 0
    count = sum(max(0.0, post_features.get(name, 0.0)) for name in VIRAL_FEATURES)
    if count < policy.min_engagements:
        return 0
    return 1 + int(math.floor(math.log(count / policy.min_engagements, policy.factor) + 1e-9))


def viral_triggers(post_id: int, author_id: int, at_ms: int, audience: Sequence[int]
                   ) -> list[Trigger]:
    """A post that reached a new engagement level re-ranks the feeds that hold it."""
    return [Trigger(u, at_ms, VIRAL, post_id, author_id) for u in audience]


def requests_from(user_id: int, triggers: Iterable[Trigger]) -> RefreshRequest:
    """Fold a user's pending triggers into one request (a deletion beats a creation; the
    posts of viral triggers are ``reread``: their features just changed)."""
    created: dict[int, Candidate] = {}
    deleted: set[int] = set()
    changed_at = None
    count = 0
    viral: set[int] = set()
    for t in triggers:
        count += 1
        changed_at = t.event_time if changed_at is None else min(changed_at, t.event_time)
        if t.reason == POST_DELETED:
            deleted.add(t.post_id)
        elif t.reason == POST_CREATED:
            created[t.post_id] = Candidate(t.post_id, t.author_id, t.created_at, t.media_type)
        elif t.reason == VIRAL:
            viral.add(t.post_id)
    if changed_at is None:
        raise ValueError("a refresh request needs at least one trigger")
    new_posts = tuple(sorted((c for pid, c in created.items() if pid not in deleted),
                             key=lambda c: c.post_id))
    return RefreshRequest(user_id, changed_at, new_posts, frozenset(deleted), count,
                          frozenset(viral))


def merge_requests(requests: Iterable[RefreshRequest]) -> list[RefreshRequest]:
    """One request per user (first-seen order): two refreshes of one user that meet in
    a batch (a backlog catching up) are done once, covering both."""
    merged: dict[int, RefreshRequest] = {}
    for r in requests:
        held = merged.get(r.user_id)
        if held is None:
            merged[r.user_id] = r
            continue
        deleted = held.deleted | r.deleted
        posts = {c.post_id: c for c in held.new_posts + r.new_posts if c.post_id not in deleted}
        merged[r.user_id] = RefreshRequest(
            r.user_id, min(held.changed_at_ms, r.changed_at_ms),
            tuple(sorted(posts.values(), key=lambda c: c.post_id)), deleted,
            held.triggers + r.triggers, held.reread | r.reread)
    return list(merged.values())


# --------------------------------------------------------------------------- debounce


@dataclasses.dataclass(frozen=True)
class Debounce:
    """When a user's pending refresh is due (times in ms, wall clock).

    A user's first change waits ``settle_ms``, so that a burst coalesces and
    the fan-out writes meanwhile; changes that arrive before the refresh join
    it. Refreshes draw on a bucket of ``burst`` tokens refilled one per
    ``interval_ms``: an occasional change is refreshed right after its settle,
    a user who changes all the time at most once per ``interval_ms`` on
    average and never more than ``burst`` times in a row. ``burst=1`` is a
    plain cool-down of ``interval_ms`` after each refresh.

    The defaults (250 ms, 2 s, 5) keep the change-to-ranked-feed p99 under 2 s
    at 300 refreshes/s and more (docs/benchmarks.md, "Ranking"); the ones
    before (500 ms, 5 s, 3) spent less refresh work on users who change all
    the time, and their p99 was 3.4-4.5 s, all of it waiting for a token.

    The bucket is one number per user, ``full_at``: when it will be full again
    (a full bucket needs no state, so the queue forgets users once they are
    past it). ``stores.redis.refresh_queue`` applies these rules in Redis;
    ``simulate_debounce`` is the same rule with a perfect clock.
    """

    settle_ms: int = 250
    interval_ms: int = 2_000
    burst: int = 5

    def __post_init__(self):
        if self.settle_ms < 0 or self.interval_ms < 1 or self.burst < 1:
            raise ValueError("settle_ms must be >= 0, interval_ms and burst >= 1")

    @property
    def slack_ms(self) -> int:
        """How long before ``full_at`` a token is there: ``(burst - 1) * interval_ms``."""
        return (self.burst - 1) * self.interval_ms

    def due(self, changed_ms: int, full_at_ms: int | None) -> int:
        """When a change at ``changed_ms`` of a user with nothing pending is refreshed."""
        at = changed_ms + self.settle_ms
        if full_at_ms is not None:
            at = max(at, full_at_ms - self.slack_ms)
        return at

    def refreshed(self, full_at_ms: int | None, at_ms: int) -> int:
        """``full_at`` after a refresh at ``at_ms`` took a token."""
        return max(full_at_ms or at_ms, at_ms) + self.interval_ms


def simulate_debounce(debounce: Debounce, event_times: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Refreshes of one user for changes at ``event_times`` with a perfect clock.

    Returns ``[(refresh_time, [event times it covers])]``: what the queue does
    when its drain never lags; the property tests and the docs use it.
    """
    out: list[tuple[int, list[int]]] = []
    due: int | None = None
    full_at: int | None = None
    pending: list[int] = []
    for t in sorted(event_times) + [None]:
        while due is not None and (t is None or due <= t):
            out.append((due, pending))
            full_at = debounce.refreshed(full_at, due)
            due, pending = None, []
        if t is None:
            break
        if due is None:
            due = debounce.due(t, full_at)
        pending.append(t)
    return out


# --------------------------------------------------------------------------- candidates


def merge_candidates(pushed: Sequence[int], pulled: Sequence[int],
                     request: RefreshRequest, meta: Mapping[int, Mapping | None],
                     tombstoned: frozenset | set, now_ms: int, policy: RankingPolicy
                     ) -> list[Candidate]:
    """The candidates of one user, newest first, at most ``policy.max_candidates``.

    ``pushed``: post ids of the home feed; ``pulled``: post ids from followed
    celebrities' timelines; ``meta``: stored metadata
    (``author_id``, ``created_at``, ``media_type``) per post id, None when
    unknown; ``tombstoned``: ids whose metadata is a deletion tombstone.
    Posts of ``request.new_posts`` the store does not know yet are taken from
    the triggering events. Dropped: deleted (tombstoned or deleted by a
    trigger), unknown, older than ``max_age_days``. A post both pushed and
    pulled counts as pushed.
    """
    oldest = now_ms - policy.max_age_ms
    deleted = request.deleted
    found: dict[int, tuple[int, Mapping | Candidate, bool]] = {}  # id -> (created, source, pulled)
    for ids, is_pulled in ((pushed, False), (pulled, True)):
        for post_id in ids:
            if post_id in found or post_id in tombstoned or post_id in deleted:
                continue
            m = meta.get(post_id)
            if m is not None and m["created_at"] >= oldest:
                found[post_id] = (m["created_at"], m, is_pulled)
    for c in request.new_posts:
        if (c.post_id not in found and c.post_id not in tombstoned and c.post_id not in deleted
                and c.created_at >= oldest):
            found[c.post_id] = (c.created_at, c, False)
    # Candidates are built for the newest max_candidates only (a feed holds more).
    newest = heapq.nlargest(policy.max_candidates, found.items(),
                            key=lambda item: (item[1][0], item[0]))
    return [source if isinstance(source, Candidate) else
            Candidate(post_id, int(source["author_id"]), created, source.get("media_type") or "",
                      is_pulled)
            for post_id, (created, source, is_pulled) in newest]


def _take(values: np.ndarray, at: np.ndarray, found: np.ndarray, fill) -> np.ndarray:
    """``values[at]`` where ``found``, ``fill`` elsewhere (``values`` may be empty)."""
    out = np.full(len(at), fill, dtype=values.dtype)
    out[found] = values[at[found]]
    return out


def _lookup(posts: PostTable, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(found, index)`` of ``ids`` in the table's sorted ``post_id``."""
    at = np.searchsorted(posts.post_id, ids)
    found = at < len(posts.post_id)
    found[found] = posts.post_id[at[found]] == ids[found]
    return found, at


def _order(major: np.ndarray, minor: np.ndarray, group: np.ndarray, majors: int,
           minors: int, groups: int) -> np.ndarray:
    """The order of rows by ``(group, major, minor)``, each a non-negative int below
    ``groups``, ``majors``, ``minors``: one sort of a packed int64 key (a third of
    ``np.lexsort``'s time on a batch), or ``np.lexsort`` when the key would not fit.
    Rows equal in all three come in no particular order."""
    if groups * majors * minors >= 1 << 62:
        return np.lexsort((minor, major, group))
    key = (group.astype(np.int64) * majors + major) * minors + minor
    return np.argsort(key)


def _newest_first(user: np.ndarray, created: np.ndarray, post_rank: np.ndarray, posts: int,
                  users: int) -> np.ndarray:
    """The order of rows by user, then newest first (creation time, then post id,
    both descending; ``post_rank``: each row's post id's rank among ``posts``
    distinct ones); (user, post) pairs are unique."""
    if not len(user):
        return np.zeros(0, np.intp)
    span = int(created.max()) - int(created.min()) + 1
    return _order(int(created.max()) - created, posts - 1 - post_rank, user, span, posts, users)


def select_candidates(users: Sequence[int], pushed: Sequence[Sequence[int]],
                      pulled: Sequence[Sequence[int]], requests: Sequence[RefreshRequest],
                      posts: PostTable, now_ms: int, policy: RankingPolicy) -> CandidateColumns:
    """``merge_candidates`` for a whole batch at once, as columns (same rules, same order).

    ``users[i]`` has home-feed ids ``pushed[i]``, pulled ids ``pulled[i]`` and
    request ``requests[i]``; ``posts`` describes the stored ids among them
    (absent: unknown). Works on arrays: a batch costs a few NumPy calls plus
    a Python step per user, not one per candidate.
    """
    n = len(users)
    # Rows: every stored id (source 0 pushed, 1 pulled), then the triggers' posts (2).
    lists = [np.asarray(x, np.int64) for x in list(pushed) + list(pulled)]
    sizes = np.array([len(x) for x in lists], np.int64)
    ids = np.concatenate(lists + [np.zeros(0, np.int64)])
    user = np.repeat(np.tile(np.arange(n), 2), sizes)
    source = np.repeat(np.repeat(np.array([0, 1], np.int8), n), sizes)
    found, at = _lookup(posts, ids)
    state = _take(posts.state, at, found, 0)
    new = [(i, c) for i, r in enumerate(requests) for c in r.new_posts]
    new_ids = np.fromiter((c.post_id for _, c in new), np.int64, len(new))
    new_found, new_at = _lookup(posts, new_ids)
    row_user = np.concatenate([user, np.fromiter((i for i, _ in new), np.int64, len(new))])
    row_post = np.concatenate([ids, new_ids])
    row_source = np.concatenate([source, np.full(len(new), 2, np.int8)])
    row_author = np.concatenate([_take(posts.author_id, at, found, 0),
                                 np.fromiter((c.author_id for _, c in new), np.int64, len(new))])
    row_created = np.concatenate([_take(posts.created_at, at, found, 0),
                                  np.fromiter((c.created_at for _, c in new), np.int64, len(new))])
    row_media = np.concatenate([_take(posts.media, at, found, ""),
                                np.array([c.media_type for _, c in new], dtype=object)])
    # Stored rows need live metadata; trigger rows only not to be tombstoned.
    new_state = _take(posts.state, new_at, new_found, 0)
    keep = np.concatenate([state == 1, new_state != 2])
    row_unstored = np.concatenate([np.zeros(len(ids), bool), new_state == 0])
    keep &= row_created >= now_ms - policy.max_age_ms
    deleted = {(i, pid) for i, r in enumerate(requests) for pid in r.deleted}
    if deleted:
        some = np.isin(row_post, np.fromiter((p for _, p in deleted), np.int64, len(deleted)))
        for k in np.flatnonzero(some & keep):
            keep[k] = (int(row_user[k]), int(row_post[k])) not in deleted
    idx = np.flatnonzero(keep)
    # One row per (user, post): the first source wins (pushed, then pulled, then triggers).
    posts_seen, post_rank = np.unique(row_post[idx], return_inverse=True)
    order = _order(post_rank, row_source[idx], row_user[idx], len(posts_seen), 3, n)
    idx, post_rank = idx[order], post_rank[order]
    first = np.ones(len(idx), bool)
    first[1:] = ((row_user[idx][1:] != row_user[idx][:-1])
                 | (row_post[idx][1:] != row_post[idx][:-1]))
    idx, post_rank = idx[first], post_rank[first]
    # Newest first per user (creation time, then post id); the first max_candidates.
    newest = _newest_first(row_user[idx], row_created[idx], post_rank, len(posts_seen), n)
    idx, post_rank = idx[newest], post_rank[newest]
    starts = np.searchsorted(row_user[idx], np.arange(n + 1))
    rank = np.arange(len(idx)) - np.repeat(starts[:-1], np.diff(starts))
    kept = rank < policy.max_candidates
    idx, post_rank = idx[kept], post_rank[kept]
    # The distinct posts of the rows left, from the ranks (no second sort).
    used = np.zeros(len(posts_seen), bool)
    used[post_rank] = True
    renumber = np.cumsum(used) - 1
    return CandidateColumns(
        users=tuple(users), offsets=np.searchsorted(row_user[idx], np.arange(n + 1)),
        post_id=row_post[idx], author_id=row_author[idx], created_at=row_created[idx],
        media=row_media[idx], pulled=row_source[idx] == 1, unstored=row_unstored[idx],
        posts=posts_seen[used], post_at=renumber[post_rank])


def recency_scores(candidates: Sequence[Candidate]) -> np.ndarray:
    """Scores of the recency ranking: the creation time (ms), newest highest."""
    return np.fromiter((c.created_at for c in candidates), dtype=np.float64,
                       count=len(candidates))


# --------------------------------------------------------------------------- diversity


class Scored(Protocol):
    author_id: int
    score: float


E = TypeVar("E", bound=Scored)


def diversify(entries: Sequence[E], top_k: int = 20, max_per_author: int = 3,
              no_adjacent: bool = True) -> list[E]:
    """Re-rank scored entries for author diversity; returns a permutation of ``entries``.

    Greedy in score order (ties: input order): each position takes the
    highest-scoring remaining entry whose author (a) is not the previous
    position's author (with ``no_adjacent``) and (b) has fewer than
    ``max_per_author`` entries in the top ``top_k`` so far (positions below
    ``top_k`` are not capped). When no remaining entry satisfies both, the
    rules give way in this order: the cap first (the highest entry of another
    author than the previous one), then adjacency (the highest entry).

    So the rules are broken only when the candidates leave no choice, and
    then as little as the greedy order can: both hold in the top ``top_k``
    whenever more than ``ceil(top_k / max_per_author)`` authors have at
    least ``max_per_author`` entries each. An author's own entries keep their
    score order, and the first entry is always the highest-scoring one.
    """
    if top_k < 0 or max_per_author < 1:
        raise ValueError("top_k must be >= 0 and max_per_author >= 1")
    # Candidates in score order are the passed-over ones (``held``, all ranked above
    # the cursor; per author, in score order) and then ``ranked[at:]``: the first one
    # the rules allow is the greedy's choice. Usually nothing is held, so a position
    # costs a step of the cursor; held entries are looked at one author at a time.
    ranked = sorted(entries, key=_minus_score)
    held: dict[int, deque[tuple[int, E]]] = {}
    at, n = 0, len(ranked)
    in_top: dict[int, int] = {}
    out: list[E] = []
    prev = None
    while len(out) < n:
        capped = len(out) < top_k
        best = None  # (rank, author) of the best allowed held entry
        for a, queue in held.items():
            if ((not no_adjacent or a != prev)
                    and (not capped or in_top.get(a, 0) < max_per_author)
                    and (best is None or queue[0][0] < best[0])):
                best = (queue[0][0], a)
        chosen = None
        while best is None and at < n:
            e = ranked[at]
            a = e.author_id
            if ((not no_adjacent or a != prev)
                    and (not capped or in_top.get(a, 0) < max_per_author)):
                chosen = e
            else:
                held.setdefault(a, deque()).append((at, e))
            at += 1
            if chosen is not None:
                break
        if chosen is None:
            if best is None:  # all that is left is held: relax the cap, then adjacency
                heads = sorted((q[0][0], a) for a, q in held.items())
                best = next((h for h in heads if not no_adjacent or h[1] != prev), heads[0])
            queue = held[best[1]]
            chosen = queue.popleft()[1]
            if not queue:
                del held[best[1]]
        prev = chosen.author_id
        if capped:
            in_top[prev] = in_top.get(prev, 0) + 1
        out.append(chosen)
    return out


def _minus_score(entry: Scored) -> float:
    return -entry.score
