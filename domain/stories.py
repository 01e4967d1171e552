"""The stories pipeline's rules as plain functions (no Beam, no stores).

The story stores and ``pipelines.stories`` adapt these: lifetimes
(``redis_expire_at_ms``, ``ttl_seconds``), the Cassandra removal timestamp
(``removal_timestamp_us``), tray order (``assemble_tray``), durable rows back as
events for ``feedbeam rebuild`` (``republished_event``, ``reviewed_event``), the
expiry index buckets (``expiry_bucket``, ``sweep_buckets``), the expiry timers'
keys and pending summary (``timer_shard``, ``wakeups``, ``add_pending``,
``settle_pending``) and the oracle (``expected_stories``). Why each rule:
docs/architecture.md, "Decision rules", and docs/pipelines/stories.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from schemas.events import STORY_TTL_MS, MediaType, StoryEvent, StoryEventKind
from schemas.stories import StoryMeta, TrayEntry, TrayStory

HOUR_MS = 3600 * 1000

#: Shards per expiry-hour partition of the durable index (spreads a busy hour).
EXPIRY_SHARDS = 16


@dataclasses.dataclass(frozen=True)
class StoryPolicy:
    """How long story state may outlive a story, and how far ahead expiries may lie.

    ``grace_ms``: Redis keys and Cassandra rows outlive ``expires_at`` by this
    much at most (so a lagging expiry step still finds what to clean, and a
    delete's tombstone outlives any replay of the publish).
    ``max_life_ms``: the latest ``expires_at`` (after the publish's event time)
    the stores accept; the start-up sweep reads the expiry index this far ahead.
    """

    grace_ms: int = HOUR_MS
    max_life_ms: int = 7 * 24 * HOUR_MS

    def __post_init__(self):
        if self.grace_ms < 1000:
            raise ValueError("grace_ms must be at least 1000 (one second)")
        if self.max_life_ms < HOUR_MS:
            raise ValueError("max_life_ms must be at least one hour")


# --------------------------------------------------------------------------- lifetimes


def story_expiry(event: StoryEvent) -> int:
    """``expires_at`` of a PUBLISHED event: its own, else created_at (or event time) + 24 h."""
    expiry = event.effective_expires_at
    return event.event_time + STORY_TTL_MS if expiry is None else expiry


def story_created_at(event: StoryEvent) -> int:
    """``created_at`` of a PUBLISHED event, defaulting to its event time."""
    return event.event_time if event.created_at is None else event.created_at


def redis_expire_at_ms(expires_at: int, policy: StoryPolicy) -> int:
    """``PEXPIREAT`` instant of a story's Redis keys."""
    return expires_at + policy.grace_ms


def ttl_seconds(expires_at: int, now_ms: int, policy: StoryPolicy) -> int:
    """Cassandra ``USING TTL`` for a row of a story expiring at ``expires_at``,
    written at ``now_ms``: whole seconds up to ``expires_at + grace`` (rounded
    up); 0 when that instant has passed (write nothing)."""
    remaining = expires_at + policy.grace_ms - now_ms
    return 0 if remaining <= 0 else math.ceil(remaining / 1000)


def removal_timestamp_us(expires_at: int) -> int:
    """``USING TIMESTAMP`` of a story's removal (see the module doc)."""
    return expires_at * 1000


def write_timestamp_us(event_time: int, expires_at: int) -> int:
    """``USING TIMESTAMP`` of an accepted write: its event time, kept below the removal's."""
    return min(event_time, expires_at - 1) * 1000


def publish_refusal(event: StoryEvent, now_ms: int, policy: StoryPolicy) -> str | None:
    """Why a PUBLISHED event must not be written, or None to write it.

    ``expired``: it expires at or before ``now_ms`` (readers would never serve
    it; after a long stop this skips the backlog's dead stories) or at or
    before its own event time. ``beyond_horizon``: it expires more than
    ``max_life_ms`` after its event time (the start-up sweep would not find it).
    """
    expires_at = story_expiry(event)
    if expires_at <= now_ms or expires_at <= event.event_time:
        return "expired"
    if expires_at - event.event_time > policy.max_life_ms:
        return "beyond_horizon"
    return None


# --------------------------------------------------------------------------- tray


def assemble_tray(followee_ids: Iterable[int], stories: Mapping[int, Sequence[StoryMeta]],
                  seen: Iterable[int], now_ms: int, limit: int) -> list[TrayEntry]:
    """The tray of a viewer from the stories of the authors they follow.

    ``stories`` maps author id to that author's stories as read (any order,
    possibly including expired ones, which are dropped here: readers filter
    at read time whatever the expiry step did). ``seen`` holds the story ids
    the viewer has seen. Returns at most ``limit`` entries: unseen first, then
    newest story first, then author id ascending. Authors the viewer does not
    follow are ignored.
    """
    if limit < 1:
        return []
    seen_ids = set(seen)
    entries: list[TrayEntry] = []
    for author in dict.fromkeys(followee_ids):
        live = sorted((s for s in stories.get(author, ()) if s.active(now_ms)
                       and s.author_id == author),
                      key=lambda s: (s.created_at, s.story_id))
        if not live:
            continue
        items = tuple(TrayStory(s.story_id, s.created_at, s.expires_at, s.media_type,
                                s.story_id in seen_ids) for s in live)
        unseen = sum(1 for i in items if not i.seen)
        entries.append(TrayEntry(author, items, unseen, live[-1].created_at))
    entries.sort(key=lambda e: (not e.has_unseen, -e.latest_created_at, e.author_id))
    return entries[:limit]


# --------------------------------------------------------------------------- expiry index


def expiry_bucket(expires_at: int) -> int:
    """Partition bucket (epoch hour) of the expiry index for a story expiring at ``expires_at``."""
    return expires_at // HOUR_MS


def expiry_shard(story_id: int) -> int:
    return story_id % EXPIRY_SHARDS


def sweep_buckets(now_ms: int, policy: StoryPolicy) -> list[int]:
    """Expiry-index buckets that may hold live or not yet cleaned stories at ``now_ms``:
    from ``now - grace`` (older rows are gone by TTL) to ``now + max_life``."""
    return list(range(expiry_bucket(now_ms - policy.grace_ms),
                      expiry_bucket(now_ms + policy.max_life_ms) + 1))


def is_publish(event: StoryEvent) -> bool:
    return event.kind is StoryEventKind.PUBLISHED


# --------------------------------------------------------------------------- rebuild


def republished_event(story: StoryMeta, policy: StoryPolicy) -> StoryEvent:
    """The PUBLISHED event that writes a durable story back through the stores'
    publish path (``feedbeam rebuild``). Its event time is the creation time,
    moved up to ``max_life_ms`` before the expiry when it lies further back: the
    story passed the horizon check when it was first published, so the rebuild
    must not refuse it now."""
    media = None if story.media_type is None else MediaType(story.media_type)
    return StoryEvent(f"rebuild-p{story.story_id}",
                      max(story.created_at, story.expires_at - policy.max_life_ms),
                      StoryEventKind.PUBLISHED, story.story_id, story.author_id,
                      created_at=story.created_at, expires_at=story.expires_at, media_type=media)


def reviewed_event(story_id: int, author_id: int, viewer_id: int, viewed_at: int) -> StoryEvent:
    """The VIEWED event that writes a durable view row back (``feedbeam rebuild``)."""
    return StoryEvent(f"rebuild-v{story_id}-{viewer_id}", viewed_at, StoryEventKind.VIEWED,
                      story_id, author_id, viewer_id=viewer_id)


# --------------------------------------------------------------------------- expiry timers


def timer_shard(story_id: int, shards: int) -> int:
    """Key of the expiry timer that removes ``story_id``: its expiry-index shard
    (``expiry_shard``) folded onto ``shards`` keys, so each key owns whole index
    partitions (``index_shards_of``)."""
    return expiry_shard(story_id) % shards


def index_shards_of(key: int, shards: int) -> list[int]:
    """The expiry-index shards whose stories timer key ``key`` (of ``shards``) removes."""
    if not 1 <= shards <= EXPIRY_SHARDS:
        raise ValueError(f"expiry timer shards must be within 1..{EXPIRY_SHARDS}")
    return [s for s in range(EXPIRY_SHARDS) if s % shards == key]


def wakeups(published: Iterable[tuple[int, int]], shards: int) -> list[tuple[int, int]]:
    """``(timer key, at)`` for ``(story_id, expires_at)`` of written stories: the
    earliest expiry per timer key and expiry-index bucket (what the key's pending
    summary needs, ``add_pending``), sorted."""
    earliest: dict[tuple[int, int], int] = {}
    for story_id, expires_at in published:
        slot = (timer_shard(story_id, shards), expiry_bucket(expires_at))
        if slot not in earliest or expires_at < earliest[slot]:
            earliest[slot] = expires_at
    return sorted((key, at) for (key, _), at in earliest.items())


def add_pending(pending: dict[int, int], at: int) -> bool:
    """Record in ``pending`` (expiry-index bucket -> earliest pending ``expires_at``
    in it) that a story expiring at ``at`` was written. True when ``pending``
    changed."""
    bucket = expiry_bucket(at)
    if bucket in pending and pending[bucket] <= at:
        return False
    pending[bucket] = at
    return True


def due_buckets(pending: Mapping[int, int], bound: int) -> list[int]:
    """Buckets of ``pending`` that may hold stories expiring at or before ``bound``."""
    last = expiry_bucket(bound)
    return sorted(b for b in pending if b <= last)


def settle_pending(pending: Mapping[int, int], drained_through: int,
                   found: Mapping[int, int]) -> dict[int, int]:
    """``pending`` after a removal round: every story expiring at or before
    ``drained_through`` is gone, and ``found`` (bucket -> earliest) is what the
    round saw left in the buckets it read. Buckets up to ``drained_through``'s
    keep only what was found; later ones are kept."""
    last = expiry_bucket(drained_through)
    out = {b: at for b, at in pending.items() if b > last}
    for b, at in found.items():
        if at > drained_through and (b not in out or at < out[b]):
            out[b] = at
    return out


# --------------------------------------------------------------------------- oracle


@dataclasses.dataclass
class ExpectedStories:
    """What the stores must hold after ``events`` were applied and every timer due
    at ``now_ms`` has fired: the live stories (``views`` = unique viewers), their
    viewers, each viewer's seen live stories, and the stories that were
    published and then deleted or expired (nothing left of them but, in Redis,
    a tombstone)."""

    live: dict[int, StoryMeta]
    viewers: dict[int, set[int]]
    seen: dict[int, set[int]]
    removed: set[int]


def expected_stories(events: Iterable[StoryEvent], now_ms: int,
                     policy: StoryPolicy) -> ExpectedStories:
    """The oracle of the stories pipeline, recomputed from the topic.

    ``events`` in partition order (a story's events share its author's
    partition, so the order among one story's events is what matters). A view
    counts if the story was published before it, not deleted before it, and
    it happened before ``expires_at``; a publish after the story's delete or
    expiry is refused.
    """
    stories: dict[int, StoryMeta] = {}
    viewers: dict[int, set[int]] = {}
    removed: set[int] = set()
    for e in events:
        if e.kind is StoryEventKind.PUBLISHED:
            expires = story_expiry(e)
            refused = expires <= e.event_time or expires - e.event_time > policy.max_life_ms
            if e.story_id in removed or e.story_id in stories or refused:
                continue
            stories[e.story_id] = StoryMeta(e.story_id, e.author_id, story_created_at(e), expires,
                                            None if e.media_type is None else e.media_type.value)
        elif e.kind is StoryEventKind.VIEWED:
            story = stories.get(e.story_id)
            if story is not None and e.event_time < story.expires_at:
                viewers.setdefault(e.story_id, set()).add(e.viewer_id)
        elif e.story_id in stories:
            del stories[e.story_id]
            viewers.pop(e.story_id, None)
            removed.add(e.story_id)
    for story_id in [s for s, meta in stories.items() if not meta.active(now_ms)]:
        del stories[story_id]
        viewers.pop(story_id, None)
        removed.add(story_id)
    seen: dict[int, set[int]] = {}
    for story_id, who in viewers.items():
        for v in who:
            seen.setdefault(v, set()).add(story_id)
    live = {s: dataclasses.replace(m, views=len(viewers.get(s, ()))) for s, m in stories.items()}
    return ExpectedStories(live, {s: v for s, v in viewers.items() if v}, seen, removed)
