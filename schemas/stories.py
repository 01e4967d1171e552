"""Typed records of the story state: what the stories pipeline writes and serving reads.

``StoryMeta`` is one story as stored; ``TrayEntry`` (with its ``TrayStory``
items) is one author's row of a viewer's story tray; ``StoryOutcome`` is what
applying one event did; ``StoryExpired`` is what the expiry step emits when it
removes a story, ``ExpiryRound`` one firing of its timer. ``StoryDurableWrites``
is what a batch's Redis writes decided for Cassandra, the stories' durable log
carries it (``encode_story_writes`` / ``decode_story_writes``). Times are ms
since the epoch.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

from schemas.events import MediaType, StoryEvent, StoryEventKind
from schemas.durable_log import MalformedLogRecord, dump_log_rows, load_log_rows


@dataclasses.dataclass(frozen=True, slots=True)
class StoryMeta:
    """One live story: who, when it was created and when it expires.

    ``views`` is the number of unique viewers (a re-delivered or repeated view
    by the same viewer counts once).
    """

    story_id: int
    author_id: int
    created_at: int
    expires_at: int
    media_type: str | None = None
    views: int = 0

    def active(self, now_ms: int) -> bool:
        """Whether the story may be served at ``now_ms`` (it expires *at* ``expires_at``)."""
        return self.expires_at > now_ms


@dataclasses.dataclass(frozen=True, slots=True)
class TrayStory:
    """One active story in a tray entry, with whether this viewer has seen it."""

    story_id: int
    created_at: int
    expires_at: int
    media_type: str | None
    seen: bool


@dataclasses.dataclass(frozen=True, slots=True)
class TrayEntry:
    """One author in a viewer's tray: their active stories, oldest first (play order).

    ``unseen`` counts the stories the viewer has not seen; ``latest_created_at``
    is the newest story's creation time (the tray's recency order).
    """

    author_id: int
    stories: tuple[TrayStory, ...]
    unseen: int
    latest_created_at: int

    @property
    def has_unseen(self) -> bool:
        return self.unseen > 0


@dataclasses.dataclass(frozen=True, slots=True)
class StoryExpired:
    """A story the expiry timer removed from the stores.

    ``removed_at`` is the wall-clock time of the removal (ms), so
    ``removed_at - expires_at`` is how long the stale state outlived the story
    (readers never served it meanwhile: they filter on ``expires_at``).
    """

    story_id: int
    author_id: int
    expires_at: int
    removed_at: int


@dataclasses.dataclass(frozen=True, slots=True)
class StoryOutcome:
    """What applying one story event did (the stories pipeline's per-event output).

    ``action``: for a publish ``published`` (written), ``tombstoned`` (deleted
    before: nothing written), ``expired`` (already expired when applied) or
    ``beyond_horizon``; for a view ``viewed`` (counted) or ``view_unknown``,
    ``view_deleted``, ``view_late`` (event time at/after expiry),
    ``view_expired`` (expired when applied); ``deleted`` for a delete.
    ``expires_at`` is the story's, when known.
    """

    event_id: str
    action: str
    story_id: int
    author_id: int
    expires_at: int | None
    event_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class ExpiryRound:
    """What one firing of an expiry timer did: the stories it removed (``expired``),
    how many due stories a delete had removed first (``after_delete``: nothing to
    announce), and what is still pending on its index shards (expiry-index
    bucket -> earliest ``expires_at``, ``domain.stories.settle_pending``)."""

    expired: tuple[StoryExpired, ...]
    after_delete: int
    pending: dict[int, int]


# --------------------------------------------------------------------------- the durable log


@dataclasses.dataclass(frozen=True, slots=True)
class DurableRemoval:
    """A story to remove from the durable tables: its seen rows of ``viewers``, its
    story and index rows and its views; ``deleted`` (a DELETED event, not the
    expiry) also records the delete in ``story_deletions`` until ``expires_at +
    grace``."""

    story_id: int
    author_id: int
    expires_at: int
    viewers: tuple[int, ...] = ()
    deleted: bool = False


class StoryDurableWrites(NamedTuple):
    """What a batch's Redis writes decided for Cassandra: the publishes Redis accepted,
    the views it counted as ``(event, author_id, expires_at)``, and the removals of
    the stories it deleted."""

    publishes: tuple[StoryEvent, ...] = ()
    views: tuple[tuple[StoryEvent, int, int], ...] = ()
    removals: tuple[DurableRemoval, ...] = ()

    @property
    def size(self) -> int:
        """How many writes (publishes, views and removals) it holds."""
        return len(self.publishes) + len(self.views) + len(self.removals)


STORY_LOG_VERSION = 1
_PUBLISH, _VIEW, _REMOVAL = "p", "v", "r"


def encode_story_writes(writes: StoryDurableWrites, max_ids: int = 5_000) -> list[bytes]:
    """``writes`` as durable log record values of at most about ``max_ids`` ids each
    (a removal counts its viewers), so no record nears Kafka's size limit."""
    if max_ids < 1:
        raise ValueError("max_ids must be >= 1")
    rows: list[list] = [
        [_PUBLISH, e.story_id, e.author_id, e.event_time, e.created_at, e.expires_at,
         None if e.media_type is None else e.media_type.value] for e in writes.publishes]
    rows += [[_VIEW, e.story_id, e.viewer_id, e.event_time, author, expires]
             for e, author, expires in writes.views]
    rows += [[_REMOVAL, r.story_id, r.author_id, r.expires_at, list(r.viewers), r.deleted]
             for r in writes.removals]
    records, current, size = [], [], 0
    for row in rows:
        n = 1 + (len(row[4]) if row[0] == _REMOVAL else 0)
        if current and size + n > max_ids:
            records.append(dump_log_rows(current, STORY_LOG_VERSION))
            current, size = [], 0
        current.append(row)
        size += n
    if current:
        records.append(dump_log_rows(current, STORY_LOG_VERSION))
    return records


def decode_story_writes(data: bytes | None) -> StoryDurableWrites:
    """The writes of one stories durable log value; ``MalformedLogRecord`` if it is
    not one."""
    publishes, views, removals = [], [], []
    for row in load_log_rows(data, STORY_LOG_VERSION, "stories durable log"):
        try:
            if not isinstance(row, list) or not row:
                raise TypeError("not a list")
            tag, fields = row[0], row[1:]
            if tag == _PUBLISH:
                publishes.append(_publish(*fields))
            elif tag == _VIEW:
                views.append(_view(*fields))
            elif tag == _REMOVAL:
                removals.append(_removal(*fields))
            else:
                raise TypeError(f"unknown tag {tag!r}")
        except (TypeError, ValueError) as exc:
            raise MalformedLogRecord("bad_write",
                                     f"stories durable write {str(row)[:200]}: {exc}") from None
    return StoryDurableWrites(tuple(publishes), tuple(views), tuple(removals))


def _ints(*values, optional: Sequence = ()) -> None:
    if not all(type(v) is int for v in values) or \
            not all(v is None or type(v) is int for v in optional):
        raise TypeError("ids and times are integers")


def _publish(story_id, author_id, event_time, created_at, expires_at, media) -> StoryEvent:
    _ints(story_id, author_id, event_time, optional=(created_at, expires_at))
    return StoryEvent("", event_time, StoryEventKind.PUBLISHED, story_id, author_id,
                      created_at=created_at, expires_at=expires_at,
                      media_type=None if media is None else MediaType(media))


def _view(story_id, viewer_id, event_time, author_id, expires_at):
    _ints(story_id, viewer_id, event_time, author_id, expires_at)
    return (StoryEvent("", event_time, StoryEventKind.VIEWED, story_id, author_id,
                       viewer_id=viewer_id), author_id, expires_at)


def _removal(story_id, author_id, expires_at, viewers, deleted) -> DurableRemoval:
    _ints(story_id, author_id, expires_at)
    if not isinstance(viewers, list) or type(deleted) is not bool:
        raise TypeError("viewers are a list, deleted true or false")
    _ints(*viewers)
    return DurableRemoval(story_id, author_id, expires_at, tuple(viewers), deleted)
