"""Typed records for the four event topics.

Each record mirrors one Avro schema under ``schemas/avro/`` field for field;
``to_avro()`` gives the dict fastavro writes and ``from_avro()`` builds the
record back from what fastavro reads, or from a JSON line of a workload file,
where a field the Avro schema gives a default (an optional field) may be
omitted. Times are milliseconds since the epoch (UTC), ids are 64-bit integers.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar, Union

STORY_TTL_MS = 24 * 3600 * 1000


class MediaType(str, enum.Enum):
    PHOTO = "PHOTO"
    VIDEO = "VIDEO"
    CAROUSEL = "CAROUSEL"
    REEL = "REEL"


class PostEventKind(str, enum.Enum):
    CREATED = "CREATED"
    DELETED = "DELETED"


class EngagementKind(str, enum.Enum):
    LIKE = "LIKE"
    UNLIKE = "UNLIKE"
    COMMENT = "COMMENT"
    SHARE = "SHARE"
    SAVE = "SAVE"
    VIEW = "VIEW"
    PROFILE_VIEW = "PROFILE_VIEW"


class StoryEventKind(str, enum.Enum):
    PUBLISHED = "PUBLISHED"
    VIEWED = "VIEWED"
    DELETED = "DELETED"


class FollowKind(str, enum.Enum):
    FOLLOW = "FOLLOW"
    UNFOLLOW = "UNFOLLOW"


def _members(enum_type, optional: bool = False) -> dict:
    """``value -> member`` of ``enum_type`` (plus ``None -> None`` if ``optional``).

    ``from_avro`` runs once per record on every read path; a dict lookup costs
    a tenth of calling the enum, and an unknown value raises ``KeyError``,
    which the codec reports as a record that does not fit its type.
    """
    members = {m.value: m for m in enum_type}
    return {None: None, **members} if optional else members


_POST_KINDS = _members(PostEventKind)
_ENGAGEMENT_KINDS = _members(EngagementKind)
_STORY_KINDS = _members(StoryEventKind)
_FOLLOW_KINDS = _members(FollowKind)
_MEDIA_TYPES = _members(MediaType)
_MEDIA_TYPES_OR_NONE = _members(MediaType, optional=True)


@dataclasses.dataclass(frozen=True, slots=True)
class PostEvent:
    """A post was created or deleted (topic ``post-events``, key ``author_id``)."""

    TOPIC: ClassVar[str] = "post-events"
    SCHEMA_NAME: ClassVar[str] = "post_event"

    event_id: str
    event_time: int
    kind: PostEventKind
    post_id: int
    author_id: int
    created_at: int
    media_type: MediaType = MediaType.PHOTO
    caption_length: int = 0
    hashtags: tuple[str, ...] = ()

    @property
    def key(self) -> bytes:
        return str(self.author_id).encode()

    def to_avro(self) -> dict:
        return {
            "event_id": self.event_id,
            "event_time": self.event_time,
            "kind": self.kind.value,
            "post_id": self.post_id,
            "author_id": self.author_id,
            "created_at": self.created_at,
            "media_type": self.media_type.value,
            "caption_length": self.caption_length,
            "hashtags": list(self.hashtags),
        }

    @classmethod
    def from_avro(cls, d: dict) -> "PostEvent":
        return cls(
            event_id=d["event_id"],
            event_time=d["event_time"],
            kind=_POST_KINDS[d["kind"]],
            post_id=d["post_id"],
            author_id=d["author_id"],
            created_at=d["created_at"],
            media_type=_MEDIA_TYPES[d["media_type"]],
            caption_length=d.get("caption_length", 0),
            hashtags=tuple(d.get("hashtags", ())),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class EngagementEvent:
    """A viewer engaged with a post or profile (topic ``engagement-events``).

    Keyed by ``post_id`` so that all engagements of one post land in one
    partition, in order; profile views (no post) are keyed by ``author_id``.
    """

    TOPIC: ClassVar[str] = "engagement-events"
    SCHEMA_NAME: ClassVar[str] = "engagement_event"

    event_id: str
    event_time: int
    kind: EngagementKind
    viewer_id: int
    author_id: int
    post_id: int | None = None
    media_type: MediaType | None = None
    dwell_ms: int | None = None

    @property
    def key(self) -> bytes:
        return str(self.post_id if self.post_id is not None else self.author_id).encode()

    def to_avro(self) -> dict:
        return {
            "event_id": self.event_id,
            "event_time": self.event_time,
            "kind": self.kind.value,
            "viewer_id": self.viewer_id,
            "author_id": self.author_id,
            "post_id": self.post_id,
            "media_type": None if self.media_type is None else self.media_type.value,
            "dwell_ms": self.dwell_ms,
        }

    @classmethod
    def from_avro(cls, d: dict) -> "EngagementEvent":
        return cls(
            event_id=d["event_id"],
            event_time=d["event_time"],
            kind=_ENGAGEMENT_KINDS[d["kind"]],
            viewer_id=d["viewer_id"],
            author_id=d["author_id"],
            post_id=d.get("post_id"),
            media_type=_MEDIA_TYPES_OR_NONE[d.get("media_type")],
            dwell_ms=d.get("dwell_ms"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class StoryEvent:
    """A story was published, viewed or deleted (topic ``story-events``, key ``author_id``)."""

    TOPIC: ClassVar[str] = "story-events"
    SCHEMA_NAME: ClassVar[str] = "story_event"

    event_id: str
    event_time: int
    kind: StoryEventKind
    story_id: int
    author_id: int
    viewer_id: int | None = None
    created_at: int | None = None
    expires_at: int | None = None
    media_type: MediaType | None = None

    @property
    def key(self) -> bytes:
        return str(self.author_id).encode()

    @property
    def effective_expires_at(self) -> int | None:
        """Expiry of a published story: ``expires_at``, else created + 24 h."""
        if self.expires_at is not None:
            return self.expires_at
        if self.created_at is not None:
            return self.created_at + STORY_TTL_MS
        return None

    def to_avro(self) -> dict:
        return {
            "event_id": self.event_id,
            "event_time": self.event_time,
            "kind": self.kind.value,
            "story_id": self.story_id,
            "author_id": self.author_id,
            "viewer_id": self.viewer_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "media_type": None if self.media_type is None else self.media_type.value,
        }

    @classmethod
    def from_avro(cls, d: dict) -> "StoryEvent":
        return cls(
            event_id=d["event_id"],
            event_time=d["event_time"],
            kind=_STORY_KINDS[d["kind"]],
            story_id=d["story_id"],
            author_id=d["author_id"],
            viewer_id=d.get("viewer_id"),
            created_at=d.get("created_at"),
            expires_at=d.get("expires_at"),
            media_type=_MEDIA_TYPES_OR_NONE[d.get("media_type")],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FollowEvent:
    """A follow edge was created or removed (topic ``follow-events``, key ``followee_id``)."""

    TOPIC: ClassVar[str] = "follow-events"
    SCHEMA_NAME: ClassVar[str] = "follow_event"

    event_id: str
    event_time: int
    kind: FollowKind
    follower_id: int
    followee_id: int

    @property
    def key(self) -> bytes:
        return str(self.followee_id).encode()

    def to_avro(self) -> dict:
        return {
            "event_id": self.event_id,
            "event_time": self.event_time,
            "kind": self.kind.value,
            "follower_id": self.follower_id,
            "followee_id": self.followee_id,
        }

    @classmethod
    def from_avro(cls, d: dict) -> "FollowEvent":
        return cls(
            event_id=d["event_id"],
            event_time=d["event_time"],
            kind=_FOLLOW_KINDS[d["kind"]],
            follower_id=d["follower_id"],
            followee_id=d["followee_id"],
        )


Event = Union[PostEvent, EngagementEvent, StoryEvent, FollowEvent]

EVENT_TYPES: tuple[type, ...] = (PostEvent, EngagementEvent, StoryEvent, FollowEvent)

#: Topic name -> record type carried on it.
TOPIC_TYPES: dict[str, type] = {t.TOPIC: t for t in EVENT_TYPES}

TOPICS: tuple[str, ...] = tuple(TOPIC_TYPES)


def dlq_topic(topic: str) -> str:
    """Name of the dead-letter twin of ``topic``."""
    return topic + ".dlq"


#: Topics besides the event topics whose ``.dlq`` twins a pipeline writes (names less any
#: prefix): ``ApplyInBatches`` (``pipelines.io.sink``) names the dead letter of an element
#: that is not an event after its namespace (the features' store sinks,
#: ``feedbeam.features``), and the fan-out's and the stories' durable steps dead-letter
#: records of their durable logs (``fanout-durable``, ``stories-durable``).
#: ``tests/unit/test_cli_options.py`` keeps it in step with the pipelines.
DERIVED_DLQ_SOURCES: tuple[str, ...] = ("feedbeam.features", "fanout-durable",
                                        "stories-durable")


def dlq_topics(prefix: str = "") -> list[str]:
    """Every ``.dlq`` topic a pipeline may write under ``prefix``: the event topics'
    twins, then the derived ones (``DERIVED_DLQ_SOURCES``)."""
    return [dlq_topic(prefix + t) for t in TOPICS + DERIVED_DLQ_SOURCES]
