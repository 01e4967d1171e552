"""Typed feature values and the feature names shared by the features pipeline, ranking and serving.

A ``FeatureValue`` is one number about one entity (``post``, ``author``,
``viewer_author``, ``viewer_media``), valid from ``valid_at_ms`` on. ``version``
breaks ties between values valid at the same time, and ``write_stamp_us``
(``valid_at_ms * 1000 + version``) orders values in every store: newer wins.
``decay()`` moves an affinity to a reader's time. The entities, names and stamp
rules: docs/architecture.md, "Feature values".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

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
    "DEFAULT_HALF_LIFE_MS", "DEFAULT_TTL_MS", "MAX_VERSION", "FeatureValue", "CandidateFeatures",
    "FeatureTTLs", "write_stamp_us", "pair_id", "split_pair", "decay", "is_fresh",
    "engagement_rank", "check_entity",
]
