"""Typed records of the fan-out: what applying an event did, and the durable writes it decided.

``stores.fanout.FeedFanout`` returns a ``FanoutOutcome`` per event and the
batch's ``DurableWrite`` records; the fan-out pipeline counts the outcomes and
ships the writes, through its durable log topic, to the step that applies
them to Cassandra (``encode_durable_writes`` / ``decode_durable_writes``).
Times are ms since the epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence, Union

from schemas.durable_log import MalformedLogRecord, dump_log_rows, load_log_rows


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutOutcome:
    """What applying one event did.

    ``action``: ``push`` (the post went to ``feeds`` feeds), ``celebrity``
    (timeline plus the top N followers), ``tombstoned`` (a create of a deleted
    post: nothing written), ``delete``, ``merge`` and ``remove`` (an edge's feed
    effect, ``feeds`` posts merged or removed), ``edge`` (edge applied, no feed
    effect), ``skipped_inactive`` (a follow merge for an inactive user),
    ``ignored`` (neither a post nor a follow event). ``subject`` is the post
    (post events) or the followee (follow events). ``written_at_ms`` is when the
    Redis feeds of a push were written.
    """

    event_id: str
    action: str
    subject: int
    feeds: int = 0
    skipped_inactive: int = 0
    event_time: int = 0
    written_at_ms: int | None = None


# -- durable writes ---------------------------------------------------------------
# What the fan-out decided to write to Cassandra, as plain values: each record
# carries its own write time, so records apply in any order and any number of
# times with the same result (``stores.fanout.DurableFeedWriter``).


class Edge(NamedTuple):
    """A follow (``follow``) or unfollow of ``follower -> followee`` at ``event_time``."""

    follower_id: int
    followee_id: int
    event_time: int
    follow: bool


class FollowerCount(NamedTuple):
    """``user_id`` had ``followers`` followers as of the edge events up to ``at_ms``."""

    user_id: int
    followers: int
    at_ms: int


class Post(NamedTuple):
    """A created post's metadata, written at its event time."""

    post_id: int
    author_id: int
    created_at: int
    media_type: str
    caption_length: int
    hashtags: tuple[str, ...]
    event_time: int


class PostTombstone(NamedTuple):
    """A deleted post, at the delete's event time."""

    post_id: int
    author_id: int
    created_at: int
    event_time: int


class TimelineAdd(NamedTuple):
    """A post on its author's timeline (written at ``created_at``)."""

    author_id: int
    post_id: int
    created_at: int
    media_type: str


class TimelineRemove(NamedTuple):
    """A post off its author's timeline (at ``created_at``: beats a replayed add)."""

    author_id: int
    post_id: int
    created_at: int


class FeedAdd(NamedTuple):
    """A post into the home feeds of ``user_ids``, written at ``at_ms``."""

    user_ids: tuple[int, ...]
    post_id: int
    author_id: int
    created_at: int
    at_ms: int


class FeedRemove(NamedTuple):
    """A post out of the home feeds of ``user_ids``, at ``at_ms``."""

    user_ids: tuple[int, ...]
    post_id: int
    created_at: int
    at_ms: int


class CelebrityAdd(NamedTuple):
    """``celebrity_id`` into the followed celebrities of each ``(user_id, followed_at)``."""

    followers: tuple[tuple[int, int], ...]
    celebrity_id: int
    at_ms: int


class CelebrityRemove(NamedTuple):
    """``celebrity_id`` out of the followed celebrities of ``user_ids``, at ``at_ms``."""

    user_ids: tuple[int, ...]
    celebrity_id: int
    at_ms: int


DurableWrite = Union[Edge, FollowerCount, Post, PostTombstone, TimelineAdd, TimelineRemove,
                     FeedAdd, FeedRemove, CelebrityAdd, CelebrityRemove]

# Wire tag of each record type; append new tags, never reuse one.
_TAGS: dict[type, str] = {
    Edge: "e", FollowerCount: "c", Post: "p", PostTombstone: "d", TimelineAdd: "t",
    TimelineRemove: "u", FeedAdd: "f", FeedRemove: "r", CelebrityAdd: "s", CelebrityRemove: "x",
}
_TYPES = {tag: t for t, tag in _TAGS.items()}
#: The records whose first field is a list of users, split across log records when large.
_FANNED = (FeedAdd, FeedRemove, CelebrityAdd, CelebrityRemove)
FORMAT_VERSION = 1


class MalformedDurableWrites(MalformedLogRecord):
    """A fan-out durable log record that does not decode; ``reason`` is machine-readable."""


def encode_durable_writes(writes: Sequence[DurableWrite], max_ids: int = 5_000) -> list[bytes]:
    """``writes`` as durable log record values, each holding at most about ``max_ids``
    ids (a push to many followers is split), so no record nears Kafka's size limit."""
    if max_ids < 1:
        raise ValueError("max_ids must be >= 1")
    records: list[bytes] = []
    current: list[list] = []
    size = 0
    for w in _split(writes, max_ids):
        n = len(w[0]) if isinstance(w, _FANNED) else 1
        if current and size + n > max_ids:
            records.append(_dump(current))
            current, size = [], 0
        current.append([_TAGS[type(w)], *w])
        size += n
    if current:
        records.append(_dump(current))
    return records


def _split(writes: Iterable[DurableWrite], max_ids: int) -> Iterable[DurableWrite]:
    for w in writes:
        if isinstance(w, _FANNED) and len(w[0]) > max_ids:
            for start in range(0, len(w[0]), max_ids):
                yield w._replace(**{w._fields[0]: tuple(w[0][start:start + max_ids])})
        else:
            yield w


def _dump(rows: list[list]) -> bytes:
    return dump_log_rows(rows, FORMAT_VERSION)


def decode_durable_writes(data: bytes | None) -> list[DurableWrite]:
    """The records of one durable log value; ``MalformedDurableWrites`` if it is not one."""
    rows = load_log_rows(data, FORMAT_VERSION, "durable log", MalformedDurableWrites)
    out: list[DurableWrite] = []
    for row in rows:
        if not isinstance(row, list) or not row or row[0] not in _TYPES:
            raise MalformedDurableWrites("bad_write", f"unknown durable write {str(row)[:200]}")
        kind = _TYPES[row[0]]
        if len(row) - 1 != len(kind._fields):
            raise MalformedDurableWrites("bad_write", f"{kind.__name__} needs "
                                         f"{len(kind._fields)} fields: {str(row)[:200]}")
        try:
            out.append(_typed(kind, row[1:]))
        except (TypeError, ValueError) as exc:
            raise MalformedDurableWrites("bad_write", f"{kind.__name__}: {exc}") from None
    return out


def _ints(values) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise TypeError("expected a list of integers")
    return tuple(values)


#: The records whose fields are all integers.
_PLAIN = (FollowerCount, PostTombstone, TimelineRemove)


def _typed(kind: type, fields: list) -> DurableWrite:
    """``kind(*fields)`` with every field checked (ids and times are integers)."""
    if kind is Edge:  # the most frequent record: checked inline
        follower, followee, event_time, follow = fields
        if type(follower) is not int or type(followee) is not int or \
                type(event_time) is not int or type(follow) is not bool:
            raise TypeError("an edge is three integers and true or false")
        return Edge(follower, followee, event_time, follow)
    if kind in _PLAIN:
        if not all(type(v) is int for v in fields):
            raise TypeError("expected integers")
        return kind._make(fields)
    if kind is Post:
        post_id, author, created, media, caption, hashtags, event_time = fields
        if not isinstance(media, str) or not isinstance(hashtags, list) or not all(
                isinstance(h, str) for h in hashtags):
            raise TypeError("media_type must be a string and hashtags a list of strings")
        return Post(*_ints([post_id, author, created]), media, *_ints([caption]),
                    tuple(hashtags), *_ints([event_time]))
    if kind is TimelineAdd:
        author, post_id, created, media = fields
        if not isinstance(media, str):
            raise TypeError("media_type must be a string")
        return TimelineAdd(*_ints([author, post_id, created]), media)
    if kind is CelebrityAdd:
        pairs, celebrity, at_ms = fields
        if not isinstance(pairs, list):
            raise TypeError("followers must be a list of [user, followed_at] pairs")
        checked = tuple(_ints(p) for p in pairs)
        if any(len(p) != 2 for p in checked):
            raise TypeError("followers must be a list of [user, followed_at] pairs")
        return CelebrityAdd(checked, *_ints([celebrity, at_ms]))
    return kind(_ints(fields[0]), *_ints(fields[1:]))  # FeedAdd, FeedRemove, CelebrityRemove
