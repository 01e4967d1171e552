"""Typed feature values and the feature names shared by the features pipeline, ranking and serving.

A ``FeatureValue`` is one number about one entity (``post``, ``author``,
``viewer_author``, ``viewer_media``), valid from ``valid_at_ms`` on. ``version``
breaks ties between values valid at the same time, and ``write_stamp_us``
(``valid_at_ms * 1000 + version``) orders values in every store: newer wins.
``FeatureColumns`` holds many values as NumPy columns (what the features
pipeline's aggregation emits). ``decay()`` moves an affinity to a reader's
time. The entities, names and stamp rules: docs/architecture.md, "Feature
values".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from schemas.events import EngagementKind, MediaType

# -- entity types ----------------------------------------------------------------

POST = "post"
AUTHOR = "author"
VIEWER_AUTHOR = "viewer_author"
VIEWER_MEDIA = "viewer_media"
ENTITY_TYPES: tuple[str, ...] = (POST, AUTHOR, VIEWER_AUTHOR, VIEWER_MEDIA)

# -- feature names -----------------------------------------------------------------

#: Engagement kinds counted per post window (an UNLIKE cancels a LIKE; profile
#: views have no post).
COUNTED_KINDS: tuple[str, ...] = ("like", "comment", "share", "save", "view")
#: Post window labels, shortest first.
POST_WINDOWS: tuple[str, ...] = ("1h", "24h")
WINDOW_MS: Mapping[str, int] = {"1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000}

POST_COUNT_FEATURES: tuple[str, ...] = tuple(
    f"{kind}_{window}" for window in POST_WINDOWS for kind in COUNTED_KINDS)
POST_RATE_FEATURES: tuple[str, ...] = tuple(f"engagement_rate_{w}" for w in POST_WINDOWS)
POST_FEATURES: tuple[str, ...] = POST_COUNT_FEATURES + POST_RATE_FEATURES

ENGAGEMENT_RATE_7D = "engagement_rate_7d"
POSTS_7D = "posts_7d"
AUTHOR_FEATURES: tuple[str, ...] = (ENGAGEMENT_RATE_7D, POSTS_7D)

AFFINITY = "affinity"
VIEWER_AUTHOR_FEATURES: tuple[str, ...] = (AFFINITY,)
VIEWER_MEDIA_FEATURES: tuple[str, ...] = (AFFINITY,)

FEATURES_BY_ENTITY: Mapping[str, tuple[str, ...]] = {
    POST: POST_FEATURES,
    AUTHOR: AUTHOR_FEATURES,
    VIEWER_AUTHOR: VIEWER_AUTHOR_FEATURES,
    VIEWER_MEDIA: VIEWER_MEDIA_FEATURES,
}

MEDIA_TYPES: tuple[str, ...] = tuple(m.value for m in MediaType)

#: Every feature name once, in a fixed order: ``FeatureColumns.name`` holds indexes into it.
FEATURE_NAMES: tuple[str, ...] = POST_FEATURES + AUTHOR_FEATURES + (AFFINITY,)

#: Engagements that count towards an engagement rate (views are the denominator).
ENGAGING_KINDS: frozenset[EngagementKind] = frozenset({
    EngagementKind.LIKE, EngagementKind.COMMENT, EngagementKind.SHARE, EngagementKind.SAVE})

# -- defaults ------------------------------------------------------------------------

DAY_MS = 86_400_000
DEFAULT_HALF_LIFE_MS = 7 * DAY_MS

#: How long a value stays readable after ``valid_at_ms`` (online store reads
#: ignore older ones; Redis keys also expire this long after their last write).
DEFAULT_TTL_MS: Mapping[str, int] = {
    POST: 2 * DAY_MS,
    AUTHOR: 8 * DAY_MS,
    VIEWER_AUTHOR: 30 * DAY_MS,
    VIEWER_MEDIA: 30 * DAY_MS,
}

#: Versions above this share the last microsecond of a write stamp.
MAX_VERSION = 999


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureValue:
    """One feature of one entity, valid from event time ``valid_at_ms`` on (see module doc)."""

    entity_type: str
    entity_id: str
    name: str
    value: float
    valid_at_ms: int
    version: int = 0

    @property
    def write_stamp_us(self) -> int:
        return write_stamp_us(self.valid_at_ms, self.version)


_NAME_ARRAY = np.array(FEATURE_NAMES, dtype=object)
_TYPE_ARRAY = np.array(ENTITY_TYPES, dtype=object)
_MEDIA_ARRAY = np.array(MEDIA_TYPES, dtype=object)
_PAIR_TYPES = (ENTITY_TYPES.index(VIEWER_AUTHOR), ENTITY_TYPES.index(VIEWER_MEDIA))


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureColumns:
    """Feature values as parallel NumPy columns (row ``i`` is one ``FeatureValue``).

    ``entity_type`` indexes ``ENTITY_TYPES`` and ``name`` indexes
    ``FEATURE_NAMES``. ``entity`` is the post, author or viewer id; ``other``
    is a pair's second part (the author id, or the media type's index in
    ``MEDIA_TYPES``), -1 for posts and authors.
    """

    entity_type: np.ndarray  # int8
    entity: np.ndarray  # int64
    other: np.ndarray  # int64
    name: np.ndarray  # int16
    value: np.ndarray  # float64
    valid_at_ms: np.ndarray  # int64
    version: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.value)

    @classmethod
    def empty(cls) -> "FeatureColumns":
        return cls(np.empty(0, np.int8), np.empty(0, np.int64), np.empty(0, np.int64),
                   np.empty(0, np.int16), np.empty(0, np.float64), np.empty(0, np.int64),
                   np.empty(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence["FeatureColumns"]) -> "FeatureColumns":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _COLUMNS))

    @classmethod
    def of(cls, values: Sequence["FeatureValue"]) -> "FeatureColumns":
        """Values (of known entity types and names) as columns."""
        types, entities, others = [], [], []
        for v in values:
            code = ENTITY_TYPES.index(v.entity_type)
            types.append(code)
            if code in _PAIR_TYPES:
                viewer, other = split_pair(v.entity_id)
                entities.append(viewer)
                others.append(int(other) if code == _PAIR_TYPES[0] else MEDIA_TYPES.index(other))
            else:
                entities.append(int(v.entity_id))
                others.append(-1)
        return cls(np.array(types, np.int8), np.array(entities, np.int64),
                   np.array(others, np.int64),
                   np.array([FEATURE_NAMES.index(v.name) for v in values], np.int16),
                   np.array([v.value for v in values], np.float64),
                   np.array([v.valid_at_ms for v in values], np.int64),
                   np.array([v.version for v in values], np.int64))

    def select(self, index) -> "FeatureColumns":
        """The rows ``index`` (a boolean mask or positions) picks."""
        return FeatureColumns(*(getattr(self, f)[index] for f in _COLUMNS))

    def write_stamps_us(self) -> np.ndarray:
        return self.valid_at_ms * 1000 + np.minimum(self.version, MAX_VERSION)

    def newest(self) -> "FeatureColumns":
        """Only the winner of each (entity, name): the latest write stamp, then the
        greater value (the stores' rule), so a store is sent what it would keep."""
        if len(self) < 2:
            return self
        order = np.lexsort((self.value, self.write_stamps_us(), self.name, self.other,
                            self.entity, self.entity_type))
        keys = (self.entity_type[order], self.entity[order], self.other[order],
                self.name[order])
        last = np.ones(len(order), dtype=bool)
        same = np.ones(len(order) - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        last[:-1] = ~same
        return self.select(order[last])

    def entity_type_names(self) -> np.ndarray:
        return _TYPE_ARRAY[self.entity_type]

    def names(self) -> np.ndarray:
        return _NAME_ARRAY[self.name]

    def entity_ids(self) -> list[str]:
        """``FeatureValue.entity_id`` of every row."""
        media = _MEDIA_ARRAY[np.where(self.entity_type == _PAIR_TYPES[1], self.other, 0)]
        out = []
        for code, entity, other, m in zip(self.entity_type.tolist(), self.entity.tolist(),
                                          self.other.tolist(), media.tolist()):
            if code == _PAIR_TYPES[0]:
                out.append(f"{entity}:{other}")
            elif code == _PAIR_TYPES[1]:
                out.append(f"{entity}:{m}")
            else:
                out.append(str(entity))
        return out

    def values(self) -> list["FeatureValue"]:
        """Every row as a ``FeatureValue``."""
        return [FeatureValue(t, e, n, v, at, ver) for t, e, n, v, at, ver in zip(
            self.entity_type_names().tolist(), self.entity_ids(), self.names().tolist(),
            self.value.tolist(), self.valid_at_ms.tolist(), self.version.tolist())]


_COLUMNS = tuple(f.name for f in dataclasses.fields(FeatureColumns))


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateFeatures:
    """Everything the ranker needs for one viewer's candidates, as of one read time.

    ``posts[i]`` / ``authors[i]`` are the feature dicts of the i-th requested
    post / author (empty when unknown or expired); ``author_affinity[i]`` is the
    viewer's affinity to the i-th author decayed to the read time (0.0 when
    absent); ``content_affinity`` maps media types to decayed affinities.
    """

    posts: list[dict[str, float]]
    authors: list[dict[str, float]]
    author_affinity: list[float]
    content_affinity: dict[str, float]


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureTTLs:
    """Read TTL per entity type, in ms (``DEFAULT_TTL_MS`` by default)."""

    post_ms: int = DEFAULT_TTL_MS[POST]
    author_ms: int = DEFAULT_TTL_MS[AUTHOR]
    viewer_author_ms: int = DEFAULT_TTL_MS[VIEWER_AUTHOR]
    viewer_media_ms: int = DEFAULT_TTL_MS[VIEWER_MEDIA]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1 ms")

    def of(self, entity_type: str) -> int:
        if entity_type == POST:
            return self.post_ms
        if entity_type == AUTHOR:
            return self.author_ms
        if entity_type == VIEWER_AUTHOR:
            return self.viewer_author_ms
        if entity_type == VIEWER_MEDIA:
            return self.viewer_media_ms
        raise ValueError(f"unknown entity type {entity_type!r}")


# -- helpers -----------------------------------------------------------------------


def write_stamp_us(valid_at_ms: int, version: int = 0) -> int:
    """Total order of the values of one (entity, name): valid_at first, version second."""
    if version < 0:
        raise ValueError("version must be non-negative")
    return valid_at_ms * 1000 + min(version, MAX_VERSION)


def pair_id(viewer_id: int, other: int | str) -> str:
    """Entity id of a viewer pair: ``"<viewer>:<author>"`` or ``"<viewer>:<MEDIA>"``."""
    return f"{viewer_id}:{other}"


def split_pair(entity_id: str) -> tuple[int, str]:
    """``(viewer_id, other)`` of a pair entity id (``other`` stays a string)."""
    viewer, sep, other = entity_id.partition(":")
    if not sep or not other:
        raise ValueError(f"not a pair entity id: {entity_id!r}")
    return int(viewer), other


def decay(score: float, from_ms: int, to_ms: int, half_life_ms: int = DEFAULT_HALF_LIFE_MS) -> float:
    """``score`` as of ``from_ms`` decayed to ``to_ms`` (never grown: earlier ``to_ms`` keeps it)."""
    if to_ms <= from_ms:
        return score
    return score * math.exp2(-(to_ms - from_ms) / half_life_ms)


def is_fresh(valid_at_ms: int, now_ms: int, ttl_ms: int) -> bool:
    """Whether a value valid from ``valid_at_ms`` may still be read at ``now_ms``."""
    return now_ms - valid_at_ms <= ttl_ms


def engagement_rank(affinity: float, valid_at_ms: int,
                    half_life_ms: int = DEFAULT_HALF_LIFE_MS) -> float | None:
    """The ``top_followers`` score of a viewer's affinity to an author:
    ``log2(affinity) + valid_at / half_life``.

    Decaying affinities to one common time multiplies each by a factor that
    depends only on its ``valid_at``, so this form orders followers exactly as
    their affinities decayed to any "now" would, and never needs rewriting as
    time passes. None for a non-positive affinity (no engagement left).
    """
    if affinity <= 0.0:
        return None
    return math.log2(affinity) + valid_at_ms / half_life_ms


def check_entity(entity_type: str, name: str) -> None:
    """``ValueError`` unless ``name`` is a feature of ``entity_type``."""
    names = FEATURES_BY_ENTITY.get(entity_type)
    if names is None:
        raise ValueError(f"unknown entity type {entity_type!r}")
    if name not in names:
        raise ValueError(f"{name!r} is not a {entity_type} feature")


__all__ = [
    "POST", "AUTHOR", "VIEWER_AUTHOR", "VIEWER_MEDIA", "ENTITY_TYPES", "COUNTED_KINDS",
    "POST_WINDOWS", "WINDOW_MS", "POST_COUNT_FEATURES", "POST_RATE_FEATURES", "POST_FEATURES",
    "ENGAGEMENT_RATE_7D", "POSTS_7D", "AUTHOR_FEATURES", "AFFINITY", "VIEWER_AUTHOR_FEATURES",
    "VIEWER_MEDIA_FEATURES", "FEATURES_BY_ENTITY", "MEDIA_TYPES", "ENGAGING_KINDS", "DAY_MS",
    "DEFAULT_HALF_LIFE_MS", "DEFAULT_TTL_MS", "MAX_VERSION", "FEATURE_NAMES", "FeatureValue",
    "FeatureColumns", "CandidateFeatures",
    "FeatureTTLs", "write_stamp_us", "pair_id", "split_pair", "decay", "is_fresh",
    "engagement_rank", "check_entity",
]
