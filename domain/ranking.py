"""The ranking pipeline's decisions as plain functions (no Beam, no stores).

``pipelines.ranking`` adapts these: triggers (``engagement_trigger``,
``follow_trigger``, ``post_triggers``, folded per user by ``requests_from``),
the follow gate (``edges_not_applied``, ``follow_gate``), the per-user
``Debounce``, ``merge_candidates``, ``recency_scores`` (the ranking without a
model) and ``diversify``. What each decides: docs/architecture.md, "Decision
rules", and docs/pipelines/ranking.md.
"""
from __future__ import annotations

import dataclasses
import heapq
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
    Candidate,
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

    def __post_init__(self):
        for name in ("max_candidates", "pushed_limit", "push_threshold", "top_k",
                     "max_per_author"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.celebrity_posts < 0:
            raise ValueError("celebrity_posts must be >= 0")
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


def post_triggers(post: PostEvent, followers: Sequence[int],
                  last_reads: Sequence[int | None], inactive_ms: int) -> list[Trigger]:
    """A created or deleted post changes the candidates of each active follower.

    Inactive followers (no feed read within ``inactive_ms`` of the post's
    event time; never-read users count as active, as in the fan-out) are
    skipped: their feeds are rebuilt on their next read.
    """
    reason = POST_DELETED if post.kind is PostEventKind.DELETED else POST_CREATED
    media = post.media_type.value if post.media_type is not None else ""
    return [Trigger(u, post.event_time, reason, post.post_id, post.author_id, post.created_at,
                    media)
            for u, last in zip(followers, last_reads)
            if is_active(last, post.event_time, inactive_ms)]


def requests_from(user_id: int, triggers: Iterable[Trigger]) -> RefreshRequest:
    """Fold a user's pending triggers into one request (a deletion beats a creation)."""
    created: dict[int, Candidate] = {}
    deleted: set[int] = set()
    changed_at = None
    count = 0
    for t in triggers:
        count += 1
        changed_at = t.event_time if changed_at is None else min(changed_at, t.event_time)
        if t.reason == POST_DELETED:
            deleted.add(t.post_id)
        elif t.reason == POST_CREATED:
            created[t.post_id] = Candidate(t.post_id, t.author_id, t.created_at, t.media_type)
    if changed_at is None:
        raise ValueError("a refresh request needs at least one trigger")
    new_posts = tuple(sorted((c for pid, c in created.items() if pid not in deleted),
                             key=lambda c: c.post_id))
    return RefreshRequest(user_id, changed_at, new_posts, frozenset(deleted), count)


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
            held.triggers + r.triggers)
    return list(merged.values())


# --------------------------------------------------------------------------- debounce


@dataclasses.dataclass(frozen=True)
class Debounce:
    """Per-user refresh timing (times in ms; see the module docstring).

    A user is in one of three states: idle (no timer), pending (changes
    waiting, timer at first change + ``settle_ms``) or cooling down (refreshed
    at F, timer at F + ``interval_ms``). The DoFn keeps the timer time in its
    state and asks these two methods what to do.
    """

    settle_ms: int = 500
    interval_ms: int = 5_000

    def __post_init__(self):
        if self.settle_ms < 0 or self.interval_ms < 1:
            raise ValueError("settle_ms must be >= 0 and interval_ms >= 1")

    def on_change(self, timer_at: int | None, event_ms: int) -> int | None:
        """A change at ``event_ms``: the timer to set, or None to keep the current one."""
        return event_ms + self.settle_ms if timer_at is None else None

    def on_timer(self, fired_at: int, pending: bool) -> tuple[bool, int | None]:
        """The timer fired: ``(refresh now?, next timer or None for idle)``.

        With changes pending: refresh and cool down until ``fired_at +
        interval_ms``. Without (a cooldown that saw no change): go idle.
        """
        if pending:
            return True, fired_at + self.interval_ms
        return False, None


def simulate_debounce(debounce: Debounce, event_times: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Refreshes of one user for changes at ``event_times`` with a perfect clock.

    Returns ``[(refresh_time, [event times it covers])]``. What the DoFn does
    under a watermark that never lags; the property tests and the docs use it.
    """
    events = sorted(event_times)
    timer: int | None = None
    pending: list[int] = []
    out: list[tuple[int, list[int]]] = []
    i = 0
    while i < len(events) or timer is not None:
        if timer is not None and (i == len(events) or timer <= events[i]):
            fired = timer
            refresh, timer = debounce.on_timer(fired, bool(pending))
            if refresh:
                out.append((fired, pending))
                pending = []
            continue
        pending.append(events[i])
        new = debounce.on_change(timer, events[i])
        if new is not None:
            timer = new
        i += 1
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
    order = sorted(range(len(entries)), key=lambda i: -entries[i].score)
    queues: dict[int, deque[int]] = {}  # author -> ranks (positions in ``order``) of its entries
    for r, i in enumerate(order):
        queues.setdefault(entries[i].author_id, deque()).append(r)
    heads = [(q[0], a) for a, q in queues.items()]  # (rank of the author's best left, author)
    heapq.heapify(heads)
    in_top: dict[int, int] = {}
    out: list[E] = []
    prev = None
    while heads:
        position = len(out)
        skipped: list[tuple[int, int]] = []
        chosen = None
        while heads:
            head = heapq.heappop(heads)
            author = head[1]
            if ((not no_adjacent or author != prev)
                    and (position >= top_k or in_top.get(author, 0) < max_per_author)):
                chosen = head
                break
            skipped.append(head)
        if chosen is None:  # skipped is in score order: relax the cap, then adjacency
            chosen = next((h for h in skipped if not no_adjacent or h[1] != prev), skipped[0])
            skipped.remove(chosen)
        for h in skipped:
            heapq.heappush(heads, h)
        author = chosen[1]
        queue = queues[author]
        out.append(entries[order[queue.popleft()]])
        if position < top_k:
            in_top[author] = in_top.get(author, 0) + 1
        if queue:
            heapq.heappush(heads, (queue[0], author))
        prev = author
    return out
