"""Semantic checks of decoded events: what a well-formed record may still get wrong.

    problem = check_event(event, record_timestamp_ms, now_ms, EventLimits())
    if problem is not None: ...   # dead-letter it: problem.reason, problem.message

A record can decode and still be unusable: an event time in seconds or
nanoseconds, a post with 600 hashtags, a negative id, a story that expires
before it was created. ``check_event`` says why (a short machine-readable
reason and a message) or returns None. It is pure (the caller passes the
clock), so decode, tests and tools apply the same rules. The limits and why
they are what they are: ``docs/pipelines/kafka-io.md`` ("Validation"); the
Avro schemas' ``doc`` fields state the size limits too.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from schemas.events import EngagementEvent, Event, FollowEvent, PostEvent, StoryEvent

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

#: 2001-09-09T01:46:40Z: an event time below it is not milliseconds (seconds are ~1.7e9).
MIN_EVENT_TIME_MS = 1_000_000_000_000

# Reasons, as written to the dead letter's ``feedbeam.error.reason`` header.
EVENT_TIME_BEFORE_FLOOR = "event_time_before_floor"
EVENT_TIME_IN_FUTURE = "event_time_in_future"
EVENT_TIME_TOO_OLD = "event_time_too_old"
RECORD_TIME_IN_FUTURE = "record_time_in_future"
TIME_FIELD_OUT_OF_RANGE = "time_field_out_of_range"
NEGATIVE_ID = "negative_id"
EVENT_ID_SIZE = "event_id_size"
TOO_MANY_HASHTAGS = "too_many_hashtags"
HASHTAG_SIZE = "hashtag_size"
CAPTION_LENGTH = "caption_length_out_of_range"
DWELL_MS = "dwell_ms_out_of_range"
STORY_EXPIRES_BEFORE_CREATION = "story_expires_before_creation"
STORY_LIFE_TOO_LONG = "story_life_too_long"

VALIDATE_STEP = "validate"


@dataclasses.dataclass(frozen=True)
class EventLimits:
    """What ``check_event`` accepts.

    Times (ms): an event time (and any other instant an event carries) must
    be at least ``min_event_time_ms`` and at most ``max_ahead_ms`` past both
    the record's Kafka timestamp and the wall clock; the Kafka timestamp
    itself at most ``max_ahead_ms`` past the wall clock. ``max_age_ms``
    (None: off) bounds how far an event time may lie before its record's
    Kafka timestamp: measured against the record, not the clock, so a replay
    of an old topic stays valid. Sizes count characters (hashtags, event id)
    or the value (caption length, dwell). A story may live at most
    ``max_story_life_ms`` after its creation.
    """

    max_ahead_ms: int = HOUR_MS
    min_event_time_ms: int = MIN_EVENT_TIME_MS
    max_age_ms: int | None = None
    max_event_id_chars: int = 128
    max_hashtags: int = 30
    max_hashtag_chars: int = 100
    max_caption_length: int = 2_200
    max_dwell_ms: int = DAY_MS
    max_story_life_ms: int = 30 * DAY_MS

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ValueError(f"{f.name} must be >= 0, not {value}")
        if self.max_event_id_chars < 1:
            raise ValueError("max_event_id_chars must be >= 1")


class Violation(NamedTuple):
    """Why an event is not accepted: ``reason`` for machines, ``message`` for people."""

    reason: str
    message: str


def check_event(event: Event, record_timestamp_ms: int, now_ms: int,
                limits: EventLimits = EventLimits()) -> Violation | None:
    """The first rule ``event`` breaks, or None if it is acceptable.

    ``record_timestamp_ms`` is the Kafka timestamp of the record the event
    came in (negative: unknown, as Kafka reports records without one);
    ``now_ms`` the wall clock. Runs once per record on every read path, so
    the common checks are inline and the type's own in one function.
    """
    ahead = limits.max_ahead_ms
    record_ts = record_timestamp_ms
    if record_ts >= 0:
        if record_ts > now_ms + ahead:
            return Violation(RECORD_TIME_IN_FUTURE,
                             f"Kafka timestamp {record_ts} is {record_ts - now_ms} ms ahead of "
                             f"the wall clock (at most {ahead} ms)")
        # The latest instant an event may claim: the earlier of the record's
        # timestamp and the clock, plus the allowed skew.
        latest = (record_ts if record_ts < now_ms else now_ms) + ahead
    else:
        latest = now_ms + ahead
    t = event.event_time
    if t < limits.min_event_time_ms:
        return Violation(EVENT_TIME_BEFORE_FLOOR,
                         f"event_time {t} is before {limits.min_event_time_ms} "
                         "(2001-09-09 by default): not milliseconds since the epoch?")
    if t > latest:
        return Violation(EVENT_TIME_IN_FUTURE,
                         f"event_time {t} is more than {ahead} ms ahead of the record's "
                         f"timestamp ({record_ts}) or the wall clock ({now_ms}): "
                         "microseconds or nanoseconds, or a wrong clock?")
    if limits.max_age_ms is not None and record_ts >= 0 and t < record_ts - limits.max_age_ms:
        return Violation(EVENT_TIME_TOO_OLD,
                         f"event_time {t} is {record_ts - t} ms before the record's timestamp "
                         f"{record_ts} (at most {limits.max_age_ms} ms)")
    n = len(event.event_id)
    if n == 0 or n > limits.max_event_id_chars:
        return Violation(EVENT_ID_SIZE, f"event_id has {n} characters "
                                        f"(1 to {limits.max_event_id_chars})")
    check = _TYPE_CHECKS.get(type(event))
    return None if check is None else check(event, latest, limits)


def _negative(event: Event, *names: str) -> Violation | None:
    for name in names:
        value = getattr(event, name)
        if value is not None and value < 0:
            return Violation(NEGATIVE_ID, f"{name} {value} is negative")
    return None


def _out_of_range(name: str, value: int, latest: int, limits: EventLimits) -> Violation | None:
    if limits.min_event_time_ms <= value <= latest:
        return None
    return Violation(TIME_FIELD_OUT_OF_RANGE,
                     f"{name} {value} is outside [{limits.min_event_time_ms}, {latest}]")


def _check_post(event: PostEvent, latest: int, limits: EventLimits) -> Violation | None:
    if event.post_id < 0 or event.author_id < 0:
        return _negative(event, "post_id", "author_id")
    problem = _out_of_range("created_at", event.created_at, latest, limits)
    if problem is not None:
        return problem
    tags = event.hashtags
    if len(tags) > limits.max_hashtags:
        return Violation(TOO_MANY_HASHTAGS, f"{len(tags)} hashtags (at most {limits.max_hashtags})")
    for tag in tags:
        if not 1 <= len(tag) <= limits.max_hashtag_chars:
            return Violation(HASHTAG_SIZE, f"a hashtag has {len(tag)} characters "
                                           f"(1 to {limits.max_hashtag_chars})")
    if not 0 <= event.caption_length <= limits.max_caption_length:
        return Violation(CAPTION_LENGTH, f"caption_length {event.caption_length} is outside "
                                         f"[0, {limits.max_caption_length}]")
    return None


def _check_engagement(event: EngagementEvent, latest: int,
                      limits: EventLimits) -> Violation | None:
    post = event.post_id
    if event.viewer_id < 0 or event.author_id < 0 or (post is not None and post < 0):
        return _negative(event, "viewer_id", "author_id", "post_id")
    dwell = event.dwell_ms
    if dwell is not None and not 0 <= dwell <= limits.max_dwell_ms:
        return Violation(DWELL_MS, f"dwell_ms {dwell} is outside [0, {limits.max_dwell_ms}]")
    return None


def _check_story(event: StoryEvent, latest: int, limits: EventLimits) -> Violation | None:
    viewer = event.viewer_id
    if event.story_id < 0 or event.author_id < 0 or (viewer is not None and viewer < 0):
        return _negative(event, "story_id", "author_id", "viewer_id")
    if event.created_at is not None:
        # expires_at lies ahead by design: bounded by the story's life below.
        problem = _out_of_range("created_at", event.created_at, latest, limits)
        if problem is not None:
            return problem
    if event.expires_at is None:
        return None
    created = event.event_time if event.created_at is None else event.created_at
    if event.expires_at <= created:
        return Violation(STORY_EXPIRES_BEFORE_CREATION,
                         f"expires_at {event.expires_at} is not after its creation {created}")
    if event.expires_at - created > limits.max_story_life_ms:
        return Violation(STORY_LIFE_TOO_LONG,
                         f"expires_at {event.expires_at} is {event.expires_at - created} ms after "
                         f"its creation (at most {limits.max_story_life_ms})")
    return None


def _check_follow(event: FollowEvent, latest: int, limits: EventLimits) -> Violation | None:
    if event.follower_id < 0 or event.followee_id < 0:
        return _negative(event, "follower_id", "followee_id")
    return None


_TYPE_CHECKS = {PostEvent: _check_post, EngagementEvent: _check_engagement,
                StoryEvent: _check_story, FollowEvent: _check_follow}


#: Per event type, its integer fields that ``check_event`` requires to be >= 0 (``None``
#: allowed where the field is optional) and the ranges it puts on others: the rules
#: ``suspect_rows`` checks a whole column at a time. Types missing here have rules on
#: lists or across fields (posts, stories): their records are checked one by one.
_COLUMN_RULES: dict[type, tuple[tuple[str, ...], dict[str, str]]] = {
    EngagementEvent: (("viewer_id", "author_id", "post_id"), {"dwell_ms": "max_dwell_ms"}),
    FollowEvent: (("follower_id", "followee_id"), {}),
}


def column_checked(record_type: type) -> bool:
    """Whether ``suspect_rows`` covers every rule of ``record_type``."""
    return record_type in _COLUMN_RULES


def suspect_rows(record_type: type, column, record_ts, now_ms: int,
                 limits: EventLimits = EventLimits()):
    """Which rows of a batch of ``record_type`` records may break a rule of
    ``check_event``: a boolean array, True for every row ``check_event`` would reject
    (and perhaps some it would not), so that only those need the per-record check;
    None for a type whose rules are not all column rules (check every record).

    ``column(name)`` gives a field's values as a NumPy array (numbers; a missing
    optional value as NaN) or, for ``event_id``, its lengths in characters;
    ``record_ts`` the records' Kafka timestamps (negative: unknown). A reader that
    builds columns anyway (the replay) checks a batch in a few array operations
    instead of a Python call per record; ``check_event`` stays the one statement of
    the rules and the reason of every rejection
    (``tests/unit/test_validation.py`` holds the two to the same verdicts)."""
    import numpy as np

    rules = _COLUMN_RULES.get(record_type)
    if rules is None:
        return None
    non_negative, bounded = rules
    ahead = limits.max_ahead_ms
    record_ts = np.asarray(record_ts, dtype=np.int64)
    known = record_ts >= 0
    latest = np.where(known, np.minimum(record_ts, now_ms), now_ms) + ahead
    t = np.asarray(column("event_time"), dtype=np.int64)
    suspect = (known & (record_ts > now_ms + ahead)) | (t < limits.min_event_time_ms)
    suspect |= t > latest
    if limits.max_age_ms is not None:
        suspect |= known & (t < record_ts - limits.max_age_ms)
    id_chars = np.asarray(column("event_id"))
    suspect |= (id_chars == 0) | (id_chars > limits.max_event_id_chars)
    with np.errstate(invalid="ignore"):  # NaN (a missing optional value) compares False
        for name in non_negative:
            suspect |= np.asarray(column(name)) < 0
        for name, limit in bounded.items():
            values = np.asarray(column(name))
            suspect |= (values < 0) | (values > getattr(limits, limit))
    return suspect


class _AvroFields:
    """A decoded Avro dict's fields as attributes: all the rules read (no copy)."""


#: Per event type, the ``_AvroFields`` type its rules are looked up by.
_FIELDS_TYPES = {t: type(f"{t.__name__}Fields", (_AvroFields,), {"__slots__": ()})
                 for t in list(_TYPE_CHECKS)}
_TYPE_CHECKS.update({_FIELDS_TYPES[t]: check for t, check in list(_TYPE_CHECKS.items())})


def check_record(record_type: type, record: dict, record_timestamp_ms: int, now_ms: int,
                 limits: EventLimits = EventLimits()) -> Violation | None:
    """``check_event`` of the ``record_type`` event a decoded Avro dict (every field of
    its reader schema, as ``WireCodec.decode_dict`` returns it) would make, without
    making it: a reader that keeps the dicts (the replay) skips building the event."""
    fields = _FIELDS_TYPES[record_type]()
    fields.__dict__ = record
    return check_event(fields, record_timestamp_ms, now_ms, limits)
