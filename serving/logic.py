"""The serving layer's decisions as plain functions: merging, paging, cursors, breakers.

Nothing here does IO; ``serving.feeds`` feeds it what the stores returned.
Chronological pages merge the pushed feed with followed celebrities' timelines
by ``(created_at ms, post_id)`` descending and continue strictly after the
cursor's ``Position`` (``merge_page``); ranked pages slice one ranked-feed
version by rank. Why pages never skip or shift: docs/serving.md, "Pages".
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import heapq
import hmac
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import orjson


class Position(NamedTuple):
    """Where a chronological page ends: the last entry's time and post id."""

    created_at: int
    post_id: int


class SourceBatch(NamedTuple):
    """Entries ``(post_id, created_at_ms)`` one source returned, newest first, and
    whether the source may hold more below them (it returned all it was asked for)."""

    entries: Sequence[tuple[int, int]]
    full: bool


class Page(NamedTuple):
    """Entries of a page and the position to continue after (None: the end).

    ``short`` is True when the page holds fewer entries than asked because a
    full source's boundary cut it (a long tie): reading more per source gives
    more; with no entries at all, the caller must read more to make progress.
    """

    entries: list[tuple[int, int]]
    next_position: Position | None
    short: bool = False


class FlatSource(NamedTuple):
    """One source's entries as Redis replies ``WITHSCORES``: ``[post_id, created_at_ms,
    post_id, created_at_ms, ...]`` (bytes or numbers), newest first, and whether the
    source may hold more below them."""

    flat: Sequence
    full: bool

    @classmethod
    def answer(cls, reply: Sequence, asked: int) -> FlatSource:
        """The reply to a read of ``asked`` entries: full when it holds them all."""
        return cls(reply, len(reply) >= 2 * asked)

    @classmethod
    def of(cls, entries: Iterable[tuple[int, int]], full: bool) -> FlatSource:
        """The source of parsed ``(post_id, created_at_ms)`` entries."""
        return cls([x for entry in entries for x in entry], full)


def merge_page(batches: Iterable[SourceBatch], after: Position | None, limit: int) -> Page:
    """``merge_flat`` over parsed entries."""
    return merge_flat([FlatSource.of(b.entries, b.full) for b in batches], after, limit)


def merge_flat(sources: Sequence[FlatSource], after: Position | None, limit: int) -> Page:
    """The next ``limit`` entries strictly after ``after`` from the union of the
    sources, deduplicated by post id (a post pushed and pulled appears once).

    Entries are trusted only above the highest boundary of a ``full`` source
    (see the module doc); ``next_position`` is None when no source has more.

    The sources are merged newest first and parsed only as far as the page
    needs: the ``limit + 1``-th distinct entry's time, ties included (a page
    pulling 64 celebrity timelines of 30 entries parses about 100 of the
    1,920). Within one time a source's order is not the post ids' (Redis
    orders tied members as strings), so the entries read are sorted at the end.
    """
    floor: int | None = None
    heap: list[tuple[int, int, int]] = []   # (-created_at, source, index of post id)
    for k, (flat, full) in enumerate(sources):
        if not flat:
            continue
        if full:
            low = int(float(flat[-1]))  # sources are newest first
            floor = low if floor is None or low > floor else floor
        heap.append((-int(float(flat[1])), k, 0))
    heapq.heapify(heap)
    best: dict[int, int] = {}
    cut: int | None = None   # once limit + 1 distinct entries: no older one matters
    while heap:
        neg, k, i = heap[0]
        ms = -neg
        if (floor is not None and ms <= floor) or (cut is not None and ms < cut):
            break
        flat = sources[k].flat
        pid = int(flat[i])
        if i + 2 < len(flat):
            heapq.heapreplace(heap, (-int(float(flat[i + 3])), k, i + 2))
        else:
            heapq.heappop(heap)
        if after is not None and (ms, pid) >= (after.created_at, after.post_id):
            continue
        if pid not in best:   # the first sighting is the newest: times only go down
            best[pid] = ms
            if cut is None and len(best) > limit:
                cut = ms
    trusted = sorted(((ms, pid) for pid, ms in best.items()), reverse=True)
    page = trusted[:limit]
    more = floor is not None or len(trusted) > limit
    short = floor is not None and len(page) < limit
    if not page:
        return Page([], after if more else None, short)
    last = page[-1]
    return Page([(pid, ms) for ms, pid in page], Position(last[0], last[1]) if more else None,
                short)


def fresh_entries(batches: Iterable[SourceBatch], generated_at_ms: int,
                  exclude: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """Up to ``limit`` entries created after the ranking was generated and not in
    it, newest first, deduplicated (the head of a ranked feed's first page)."""
    skip = set(exclude)
    best: dict[int, int] = {}
    for batch in batches:
        for pid, ms in batch.entries:
            if ms > generated_at_ms and pid not in skip and best.get(pid, -1) < ms:
                best[pid] = ms
    ordered = sorted(((ms, pid) for pid, ms in best.items()), reverse=True)[:limit]
    return [(pid, ms) for ms, pid in ordered]


def needs_rebuild(last_read_ms: int | None, feed_size: int, now_ms: int, inactive_ms: int) -> bool:
    """Whether a read must rebuild the feed first: the Redis feed is empty (a
    cold user, or a lost cache), or the user was inactive long enough that
    fan-out stopped pushing to them (``fanout_logic.is_active``)."""
    if feed_size == 0:
        return True
    return last_read_ms is not None and last_read_ms < now_ms - inactive_ms


def rebuild_entries(sources: Iterable[Sequence[tuple[int, int]]], cap: int) -> list[tuple[int, int]]:
    """The newest ``cap`` distinct ``(post_id, created_at_ms)`` of a rebuild's sources."""
    best: dict[int, int] = {}
    for entries in sources:
        for pid, ms in entries:
            if best.get(pid, -1) < ms:
                best[pid] = ms
    ordered = sorted(((ms, pid) for pid, ms in best.items()), reverse=True)[:cap]
    return [(pid, ms) for ms, pid in ordered]


# -- cursors -------------------------------------------------------------------------


class CursorError(ValueError):
    """A cursor that this server did not issue for this user and feed."""


class ChronoCursor(NamedTuple):
    user_id: int
    position: Position


class RankedCursor(NamedTuple):
    user_id: int
    generated_at_ms: int
    offset: int


class TrayCursor(NamedTuple):
    """Where the next story-tray page starts: the rank of the next followee
    (most recent follow first)."""

    user_id: int
    offset: int


Cursor = ChronoCursor | RankedCursor | TrayCursor


class CursorCodec:
    """Opaque cursors: the state as compact JSON, a keyed 8-byte BLAKE2b tag (so a
    client cannot forge one, e.g. for another user), base64url without padding."""

    _TAG = 8

    def __init__(self, key: bytes):
        if not key:
            raise ValueError("the cursor key must not be empty")
        self._key = hashlib.blake2b(key, digest_size=32, person=b"fb-cursor").digest()

    def _tag(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._key, digest_size=self._TAG).digest()

    def encode(self, cursor: Cursor) -> str:
        if isinstance(cursor, ChronoCursor):
            state = ["c", cursor.user_id, cursor.position.created_at, cursor.position.post_id]
        elif isinstance(cursor, TrayCursor):
            state = ["t", cursor.user_id, cursor.offset, 0]
        else:
            state = ["r", cursor.user_id, cursor.generated_at_ms, cursor.offset]
        body = orjson.dumps(state)
        return base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode()

    def decode(self, text: str) -> Cursor:
        """The cursor's state; ``CursorError`` for anything not issued by ``encode``."""
        if not text or len(text) > 200:
            raise CursorError("bad cursor: empty or too long")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            raise CursorError("bad cursor: not base64url") from None
        body, tag = raw[:-self._TAG], raw[-self._TAG:]
        if len(raw) <= self._TAG or not hmac.compare_digest(tag, self._tag(body)):
            raise CursorError("bad cursor: not issued by this server")
        try:
            kind, user_id, a, b = orjson.loads(body)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise CursorError("bad cursor: unreadable") from None
        if kind == "c":
            return ChronoCursor(int(user_id), Position(int(a), int(b)))
        if kind == "r":
            return RankedCursor(int(user_id), int(a), int(b))
        if kind == "t":
            return TrayCursor(int(user_id), int(a))
        raise CursorError("bad cursor: unknown kind")


# -- circuit breaker ------------------------------------------------------------------


@dataclasses.dataclass
class CircuitBreaker:
    """Stops calling a store that keeps failing, and probes it again later.

    Closed: calls go through; ``failure_threshold`` failures in a row open it.
    Open: ``allow()`` is False (callers go straight to the fallback) until
    ``reset_after_s`` passed; then one call at a time is let through as a probe
    (half-open) until one succeeds (closed again) or fails (open again).
    """

    failure_threshold: int = 3
    reset_after_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing_since: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probing_since is not None else "open"

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        now = self.clock()
        if now - self.opened_at < self.reset_after_s:
            return False
        # One probe at a time; a probe that never reported back frees the slot after a while.
        if self.probing_since is not None and now - self.probing_since < self.reset_after_s:
            return False
        self.probing_since = now
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = self.probing_since = None

    def failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
            self.probing_since = None


# -- deleted posts ----------------------------------------------------------------------


def stream_id(entry_id: bytes) -> tuple[int, int]:
    """A Redis stream entry id (``b"<ms>-<seq>"``) as a comparable pair."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class DeletionFollower:
    """Whether a worker's cached post metadata still shows every delete: it follows
    the fan-out's log of deleted posts (``KeyLayout.deleted_posts``), one read per
    ``poll_s`` riding on a request's round trip.

    The caller asks ``due(now)`` before a round trip; when due it adds the read
    (from the log's head at first, ``last_id`` on), hands the replies to
    ``start``/``advance`` with the time it sent them, marks the posts they name
    deleted in its cache, and clears the cache when told to. ``current(now)``:
    the last read answered within ``poll_s + grace_s``, so a cached post is at
    most about that stale; past it (Redis failing, the log unread) the caller
    falls back to its short cache age. ``reset()`` after Redis lost its data.
    """

    #: ``last_id`` of a log that was empty when first read.
    EMPTY = b"0-0"

    def __init__(self, poll_s: float, grace_s: float, batch: int = 1000):
        self.poll_s, self.grace_s, self.batch = poll_s, grace_s, batch
        self.reset()

    def due(self, now: float) -> bool:
        """Whether the round trip sent at ``now`` should carry a read of the log
        (one per ``poll_s``; ``poll_s`` 0: never)."""
        if self.poll_s <= 0 or now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        return True

    def start(self, head: Sequence[bytes], sent_at: float) -> None:
        """Follow from ``head``, the log's newest entry id (empty: an empty log) as
        read at ``sent_at``. The caller clears its cache: what it holds may be
        of posts whose deletes are logged at or before the head."""
        self.last_id = head[0] if head else self.EMPTY
        self._current_until = sent_at + self.poll_s + self.grace_s

    def advance(self, ids: Sequence[bytes], oldest: Sequence[bytes], sent_at: float) -> bool:
        """``ids``: the entries read after ``last_id``; ``oldest``: the log's oldest
        entry id (empty: an empty log), both read at ``sent_at``. Returns whether
        the log was trimmed past ``last_id`` (deletes were missed: the caller
        clears its cache)."""
        trimmed = (bool(oldest) and self.last_id != self.EMPTY
                   and stream_id(oldest[0]) > stream_id(self.last_id))
        if ids:
            self.last_id = ids[-1]
        if len(ids) >= self.batch:
            self._next_poll = 0.0  # more to read: the next round trip reads on
        else:
            self._current_until = sent_at + self.poll_s + self.grace_s
        return trimmed

    def current(self, now: float) -> bool:
        return now < self._current_until

    def reset(self) -> None:
        """Not read yet: the next due read starts from the log's head."""
        self.last_id: bytes | None = None
        self._next_poll = 0.0
        self._current_until = float("-inf")
