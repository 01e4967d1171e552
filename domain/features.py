"""The features pipeline's rules as plain Python, one event at a time (no Beam, no stores).

These per-event stages (``FirstStage``, ``AuthorStage``, ``ViewerStage``) are the
reference: the pipeline runs the batch form of the same rules
(``domain.feature_aggregator``), which the unit tests compare with them, and
``jobs/synthetic.py`` replays them for training sets. The parameters
(``FeatureParams``), item codes and top-followers scoring here are shared. Events
travel between stages as compact ``Item`` tuples ``(kind, t, viewer, author,
post, media, dwell, like_t)`` with small-int ``kind`` and ``media`` codes and -1
for "none" (``CANCEL``: an unlike paired with its like). The rules (windows as
change points, unlikes, lateness, versions, dedup, affinity): docs/architecture.md,
"Decision rules", and docs/pipelines/features.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent
from schemas.features import (
    AFFINITY,
    AUTHOR,
    DAY_MS,
    DEFAULT_HALF_LIFE_MS,
    DEFAULT_TTL_MS,
    ENGAGEMENT_RATE_7D,
    POST,
    POSTS_7D,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    WINDOW_MS,
    FeatureValue,
    engagement_rank,
    split_pair,
)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000

# -- items -------------------------------------------------------------------------

LIKE, COMMENT, SHARE, SAVE, VIEW, PROFILE_VIEW, UNLIKE, CANCEL, POST_CREATED = range(9)
KIND_CODES: Mapping[EngagementKind, int] = {
    EngagementKind.LIKE: LIKE, EngagementKind.COMMENT: COMMENT, EngagementKind.SHARE: SHARE,
    EngagementKind.SAVE: SAVE, EngagementKind.VIEW: VIEW,
    EngagementKind.PROFILE_VIEW: PROFILE_VIEW, EngagementKind.UNLIKE: UNLIKE,
}
KINDS_BY_CODE: Mapping[int, EngagementKind] = {v: k for k, v in KIND_CODES.items()}
MEDIA_BY_CODE: tuple[MediaType, ...] = tuple(MediaType)
MEDIA_CODES: Mapping[MediaType, int] = {m: i for i, m in enumerate(MEDIA_BY_CODE)}
#: Counted kinds of a post, in ``schemas.features.COUNTED_KINDS`` order (code = index).
POST_COUNTED = (LIKE, COMMENT, SHARE, SAVE, VIEW)
#: Author counters: engagements (likes net of unlikes, comments, shares, saves), views, posts.
A_ENGAGED, A_VIEWS, A_POSTS = range(3)


class Item(NamedTuple):
    """One event as it travels between stages (see module doc)."""

    kind: int
    t: int
    viewer: int
    author: int
    post: int
    media: int
    dwell: int
    like_t: int = -1


def engagement_item(e: EngagementEvent) -> Item:
    return Item(KIND_CODES[e.kind], e.event_time, e.viewer_id, e.author_id,
                -1 if e.post_id is None else e.post_id,
                -1 if e.media_type is None else MEDIA_CODES[e.media_type],
                -1 if e.dwell_ms is None else e.dwell_ms)


def post_item(p: PostEvent) -> Item:
    return Item(POST_CREATED, p.event_time, -1, p.author_id, p.post_id,
                MEDIA_CODES[p.media_type], -1)


def event_of(event_id: str, item: Item) -> EngagementEvent:
    """The engagement event an item came from (for dead letters: re-encoded to wire bytes)."""
    return EngagementEvent(
        event_id=event_id, event_time=item.t, kind=KINDS_BY_CODE[item.kind],
        viewer_id=item.viewer, author_id=item.author,
        post_id=None if item.post < 0 else item.post,
        media_type=None if item.media < 0 else MEDIA_BY_CODE[item.media],
        dwell_ms=None if item.dwell < 0 else item.dwell)


def first_stage_key(item: Item) -> int:
    """Key of the first (dedup, lateness, post) stage: the post id, or for a profile
    view (no post) ``-1 - author_id`` (ids are non-negative, so keys never collide)."""
    return item.post if item.post >= 0 else -1 - item.author


# -- parameters ------------------------------------------------------------------------

DEFAULT_WEIGHTS: Mapping[int, float] = {
    LIKE: 1.0, COMMENT: 2.0, SHARE: 3.0, SAVE: 2.0, VIEW: 0.5, PROFILE_VIEW: 1.0}
_WEIGHT_NAMES = {"like": LIKE, "comment": COMMENT, "share": SHARE, "save": SAVE, "view": VIEW,
                 "profile_view": PROFILE_VIEW}


def parse_weights(text: str) -> dict[int, float]:
    """``"like=1,comment=2"`` -> weights by kind code (unnamed kinds keep their default)."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in _WEIGHT_NAMES:
            raise ValueError(f"affinity weight {part!r}: expected one of "
                             f"{sorted(_WEIGHT_NAMES)}=<number>")
        weights[_WEIGHT_NAMES[name.strip()]] = float(value)
    return weights


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """Windows, lateness, dedup and decay of the features pipeline (``FeaturesOptions``)."""

    slide_ms: int = 5 * MINUTE_MS
    author_slide_ms: int = HOUR_MS
    allowed_lateness_ms: int = HOUR_MS
    dedup_horizon_ms: int = 2 * HOUR_MS
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    affinity_ttl_ms: int = DEFAULT_TTL_MS[VIEWER_AUTHOR]
    weights: Mapping[int, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    dwell_ref_ms: int = 10_000

    def __post_init__(self):
        for name in ("slide_ms", "author_slide_ms", "half_life_ms", "affinity_ttl_ms",
                     "dwell_ref_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("allowed_lateness_ms", "dedup_horizon_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for label in ("1h", "24h"):
            if WINDOW_MS[label] % self.slide_ms:
                raise ValueError(f"slide {self.slide_ms} ms must divide the {label} window")
        if WINDOW_MS["7d"] % self.author_slide_ms:
            raise ValueError(f"author slide {self.author_slide_ms} ms must divide 7 days")

    @property
    def post_spec(self) -> "WindowSpec":
        return WindowSpec(self.slide_ms, (WINDOW_MS["1h"], WINDOW_MS["24h"]), len(POST_COUNTED),
                          self.allowed_lateness_ms, post_features)

    @property
    def author_spec(self) -> "WindowSpec":
        return WindowSpec(self.author_slide_ms, (WINDOW_MS["7d"],), 3, self.allowed_lateness_ms,
                          author_features)

    def weight(self, item: Item) -> float:
        w = self.weights.get(item.kind, 0.0)
        if item.kind == VIEW:
            w *= min(max(item.dwell, 0), self.dwell_ref_ms) / self.dwell_ref_ms
        return w


# -- feature functions -------------------------------------------------------------------


def _rate(engaged: float, views: float) -> float:
    return engaged / views if views > 0 else 0.0


def post_features(totals: Sequence[Sequence[int]]) -> dict[str, float]:
    """Post features from per-window counter totals (1 h, 24 h; ``POST_COUNTED`` order)."""
    out: dict[str, float] = {}
    for label, counts in zip(("1h", "24h"), totals):
        like, comment, share, save, view = counts
        out[f"like_{label}"] = float(like)
        out[f"comment_{label}"] = float(comment)
        out[f"share_{label}"] = float(share)
        out[f"save_{label}"] = float(save)
        out[f"view_{label}"] = float(view)
        out[f"engagement_rate_{label}"] = _rate(like + comment + share + save, view)
    return out


def author_features(totals: Sequence[Sequence[int]]) -> dict[str, float]:
    """Author features from the 7-day totals (``A_ENGAGED``, ``A_VIEWS``, ``A_POSTS``)."""
    (engaged, views, posts), = totals
    return {ENGAGEMENT_RATE_7D: _rate(engaged, views), POSTS_7D: float(posts)}


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Sliding windows of one entity type: ``widths`` sliding by ``slide``, ``n`` counters."""

    slide: int
    widths: tuple[int, ...]
    n: int
    lateness: int
    features: Callable[[Sequence[Sequence[int]]], dict[str, float]]

    @property
    def retention(self) -> int:
        """How long after its start a bucket is kept: past every window and the lateness."""
        return max(max(self.widths), self.lateness) + self.slide

    def bucket(self, t: int) -> int:
        return t - t % self.slide


# -- windowed counts ---------------------------------------------------------------------


class _Slots:
    """Pickles a ``__slots__`` class as the tuple of its slots (compact keyed state)."""

    __slots__ = ()

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, values):
        for s, v in zip(self.__slots__, values):
            setattr(self, s, v)


class WindowState(_Slots):
    """Bucketed counters of one entity plus what is emitted and when (keyed state).

    ``cancels`` holds ``(like bucket start, cancel time, counter)``: the like
    stops counting in windows ending after the cancel time.
    """

    __slots__ = ("buckets", "cancels", "due", "last", "last_at", "known_wm")

    def __init__(self):
        self.buckets: dict[int, list[int]] = {}
        self.cancels: list[tuple[int, int, int]] = []
        self.due: set[int] = set()
        self.last: dict[str, float] = {}
        self.last_at: int | None = None
        self.known_wm: int | None = None

    # -- reading

    def totals(self, spec: WindowSpec, end: int) -> list[list[int]]:
        """Counter totals of each window ending at ``end``."""
        out = []
        for width in spec.widths:
            start = end - width
            inside = [c for s, c in self.buckets.items() if start <= s < end]
            sums = [sum(column) for column in zip(*inside)] if inside else [0] * spec.n
            for s, cancel_t, i in self.cancels:
                if start <= s < end and cancel_t < end:
                    sums[i] -= 1
            out.append(sums)
        return out

    def values(self, spec: WindowSpec, end: int) -> dict[str, float]:
        return spec.features(self.totals(spec, end))

    def version(self, spec: WindowSpec, end: int) -> int:
        """Events and cancels in the widest window ending at ``end``."""
        start = end - max(spec.widths)
        n = sum(sum(c) for s, c in self.buckets.items() if start <= s < end)
        return n + sum(1 for s, cancel_t, _ in self.cancels if start <= s < end and cancel_t < end)

    def emit(self, spec: WindowSpec, end: int, entity_type: str, entity_id: str,
             values: dict[str, float]) -> list[FeatureValue]:
        version = self.version(spec, end)
        return [FeatureValue(entity_type, entity_id, name, value, end, version)
                for name, value in values.items()]

    def change_points(self, spec: WindowSpec, s: int) -> list[int]:
        """Window ends where bucket ``s`` enters or leaves a window."""
        return [s + spec.slide] + [s + w + spec.slide for w in spec.widths]

    def _all_points(self, spec: WindowSpec) -> set[int]:
        points: set[int] = set()
        for s in self.buckets:
            points.update(self.change_points(spec, s))
        for s, cancel_t, _ in self.cancels:
            points.update(self.change_points(spec, s))
            points.add(spec.bucket(cancel_t) + spec.slide)
        return points

    # -- updating

    def _schedule(self, spec: WindowSpec, points: Iterable[int], t: int,
                  entity_type: str, entity_id: str) -> list[FeatureValue]:
        """Queue future change points; re-emit the passed ones a late change affects."""
        wm = self.known_wm
        future = [p for p in points if wm is None or p > wm]
        self.due.update(future)
        if wm is None or spec.bucket(t) + spec.slide > wm:
            return []
        # Late: windows already emitted contain the change. Re-emit every passed
        # change point it affects, all names (their version counts the change).
        horizon = spec.bucket(t) + max(spec.widths) + spec.slide
        passed = sorted(p for p in self._all_points(spec) if t < p <= wm and p <= horizon)
        out = []
        for p in passed:
            out += self.emit(spec, p, entity_type, entity_id, self.values(spec, p))
        if self.last_at is not None:
            self.last = self.values(spec, self.last_at)
        return out

    def add(self, spec: WindowSpec, counter: int, t: int, entity_type: str, entity_id: str,
            n: int = 1) -> list[FeatureValue]:
        """Count ``n`` at time ``t``; returns re-emitted values when ``t`` is late."""
        s = spec.bucket(t)
        counts = self.buckets.get(s)
        if counts is None:
            counts = self.buckets[s] = [0] * spec.n
        counts[counter] += n
        return self._schedule(spec, self.change_points(spec, s), t, entity_type, entity_id)

    def cancel(self, spec: WindowSpec, counter: int, like_t: int, cancel_t: int,
               entity_type: str, entity_id: str) -> list[FeatureValue]:
        """A like at ``like_t`` stops counting from ``cancel_t`` on."""
        self.cancels.append((spec.bucket(like_t), cancel_t, counter))
        points = [spec.bucket(cancel_t) + spec.slide]
        return self._schedule(spec, points, cancel_t, entity_type, entity_id)

    def note(self, spec: WindowSpec, t: int) -> None:
        """Ask for a timer at the end of ``t``'s bucket (to learn the watermark)."""
        p = spec.bucket(t) + spec.slide
        if self.known_wm is None or p > self.known_wm:
            self.due.add(p)

    def next_timer(self, spec: WindowSpec) -> int | None:
        """The next change point, else when the oldest bucket is forgotten."""
        if self.due:
            return min(self.due)
        if self.buckets:
            return min(self.buckets) + spec.retention
        return None

    def advance(self, at: int) -> bool:
        """Record that the watermark reached ``at``; False for a stale timer (nothing due)."""
        if self.known_wm is not None and at < self.known_wm:
            self.due = {p for p in self.due if p > at}
            return False
        self.known_wm = at
        self.due = {p for p in self.due if p > at}
        return True

    def fire(self, spec: WindowSpec, at: int, entity_type: str,
             entity_id: str) -> list[FeatureValue]:
        """The watermark reached ``at``: emit the values that changed, forget old buckets."""
        if not self.advance(at):
            return []
        values = self.values(spec, at)
        out = self.emit(spec, at, entity_type, entity_id,
                        {name: v for name, v in values.items() if self.last.get(name) != v})
        self.last, self.last_at = values, at
        cutoff = at - spec.retention
        if any(s <= cutoff for s in self.buckets):
            self.buckets = {s: c for s, c in self.buckets.items() if s > cutoff}
        if self.cancels:
            self.cancels = [c for c in self.cancels if c[0] > cutoff]
        return out

    def idle(self) -> bool:
        """Nothing counted any more and nothing left to emit."""
        return not self.buckets and not self.due


# -- first stage: dedup, lateness, unlike pairing, post windows -----------------------------


class Outcome(NamedTuple):
    """What the first stage did with one event."""

    status: str  # "counted", "late", "too_late", "duplicate"
    features: list  # FeatureValue re-emitted by a late event
    forward: list  # Items for the author and viewer stages
    unmatched_unlike: bool = False


#: Kinds of the forwarded ``Item``s the author stage takes (engagement, views, posts).
TO_AUTHOR_STAGE = frozenset({LIKE, COMMENT, SHARE, SAVE, VIEW, CANCEL, POST_CREATED})
#: Kinds of the forwarded ``Item``s the viewer stage takes (the affinities' events).
TO_VIEWER_STAGE = frozenset({LIKE, COMMENT, SHARE, SAVE, VIEW, PROFILE_VIEW, CANCEL})


class PostState:
    """Keyed state of one first-stage key (a post, or an author's profile views)."""

    __slots__ = ("window", "seen", "seen_by_bucket", "likes", "unlikes", "pairs_min")

    def __init__(self):
        self.window = WindowState()
        self.seen: set[str] = set()  # event ids within the dedup horizon
        self.seen_by_bucket: dict[int, list[str]] = {}  # slide start -> ids (to forget them)
        self.likes: dict[int, list[int]] = {}  # viewer -> unpaired like times
        self.unlikes: dict[int, list[int]] = {}  # viewer -> unpaired unlike times
        self.pairs_min: int | None = None  # the oldest time in likes / unlikes

    def __getstate__(self):
        return (self.window, self.seen, self.seen_by_bucket, self.likes, self.unlikes,
                self.pairs_min)

    def __setstate__(self, values):
        (self.window, self.seen, self.seen_by_bucket, self.likes, self.unlikes,
         self.pairs_min) = values

    def remember(self, event_id: str, bucket: int) -> None:
        self.seen.add(event_id)
        ids = self.seen_by_bucket.get(bucket)
        if ids is None:
            self.seen_by_bucket[bucket] = [event_id]
        else:
            ids.append(event_id)

    def forget_before(self, cutoff: int) -> None:
        """Forget the ids of slides starting before ``cutoff``."""
        for bucket in [b for b in self.seen_by_bucket if b < cutoff]:
            self.seen.difference_update(self.seen_by_bucket.pop(bucket))

    def hold_pair(self, table: dict, viewer: int, t: int) -> None:
        table.setdefault(viewer, []).append(t)
        if self.pairs_min is None or t < self.pairs_min:
            self.pairs_min = t

    def drop_pairs_before(self, cutoff: int) -> None:
        if self.pairs_min is None or self.pairs_min >= cutoff:
            return
        oldest = None
        for table in (self.likes, self.unlikes):
            for viewer in list(table):
                kept = [t for t in table[viewer] if t >= cutoff]
                if kept:
                    table[viewer] = kept
                    oldest = min(kept) if oldest is None else min(oldest, min(kept))
                else:
                    del table[viewer]
        self.pairs_min = oldest


class FirstStage:
    """Dedup, lateness, unlike pairing and post windows for one key's events."""

    new_state = PostState

    def __init__(self, params: FeatureParams):
        self.params = params
        self.spec = params.post_spec
        # The latest timer this instance saw fire, on any key: the stage's input
        # watermark is one for all keys, so it is past that too. It lets a key
        # without state (a new post, or one whose state expired) judge lateness.
        self.observed_wm: int | None = None

    def watermark(self, state: PostState | None) -> int | None:
        """The best known lower bound of the watermark for ``state``'s key."""
        own = None if state is None else state.window.known_wm
        if own is None or (self.observed_wm is not None and self.observed_wm > own):
            return self.observed_wm
        return own

    def too_late(self, state: PostState | None, t: int) -> bool:
        wm = self.watermark(state)
        return wm is not None and t + self.params.allowed_lateness_ms < wm

    def apply(self, state: PostState, event_id: str, item: Item) -> Outcome:
        w = state.window
        if event_id in state.seen:
            return Outcome("duplicate", [], [])
        if self.too_late(state, item.t):
            return Outcome("too_late", [], [])
        state.remember(event_id, self.spec.bucket(item.t))
        late = w.known_wm is not None and self.spec.bucket(item.t) + self.spec.slide <= w.known_wm
        status = "late" if late else "counted"
        kind = item.kind
        if kind == PROFILE_VIEW:
            w.note(self.spec, item.t)  # nothing to count here: the other stages do
            return Outcome(status, [], [item])
        if kind == POST_CREATED:
            # The post's features start at the end of its creation slide (zeros
            # until engagement). Read after its engagement (another topic), that
            # point may have passed: emit it now.
            at = self.spec.bucket(item.t) + self.spec.slide
            if w.known_wm is not None and at <= w.known_wm:
                return Outcome(status, self._values_at(w, item.post, at), [item])
            w.note(self.spec, item.t)
            return Outcome(status, [], [item])
        entity = str(item.post)
        if kind == UNLIKE:
            like_t = self._pair_unlike(state, item)
            if like_t is None:
                return Outcome(status, [], [], unmatched_unlike=True)
            cancel = item._replace(kind=CANCEL, like_t=like_t)
            feats = w.cancel(self.spec, 0, like_t, item.t, POST, entity)
            return Outcome(status, feats, [cancel])
        feats = w.add(self.spec, kind, item.t, POST, entity)
        forward = [item]
        if kind == LIKE:
            unlike_t = self._pair_like(state, item)
            if unlike_t is not None:
                cancel = item._replace(kind=CANCEL, t=unlike_t, like_t=item.t)
                feats += w.cancel(self.spec, 0, item.t, unlike_t, POST, entity)
                forward.append(cancel)
        return Outcome(status, feats, forward)

    def _values_at(self, w: WindowState, post: int, at: int) -> list[FeatureValue]:
        return w.emit(self.spec, at, POST, str(post), w.values(self.spec, at))

    @staticmethod
    def _pair_unlike(state: PostState, item: Item) -> int | None:
        """The latest unpaired like of the viewer before the unlike (consumed), else the
        unlike waits for its like."""
        likes = state.likes.get(item.viewer)
        earlier = [t for t in likes or () if t <= item.t]
        if not earlier:
            state.hold_pair(state.unlikes, item.viewer, item.t)
            return None
        like_t = max(earlier)
        likes.remove(like_t)
        if not likes:
            del state.likes[item.viewer]
        return like_t

    @staticmethod
    def _pair_like(state: PostState, item: Item) -> int | None:
        """An unlike that arrived before this like and cancels it (the earliest unpaired
        unlike at or after the like), else the like is remembered for a later unlike."""
        unlikes = state.unlikes.get(item.viewer)
        later = [t for t in unlikes or () if t >= item.t]
        if later:
            # Only if no other unpaired like of the viewer sits between them.
            unlike_t = min(later)
            others = [t for t in state.likes.get(item.viewer, ()) if item.t < t <= unlike_t]
            if not others:
                unlikes.remove(unlike_t)
                if not unlikes:
                    del state.unlikes[item.viewer]
                return unlike_t
        state.hold_pair(state.likes, item.viewer, item.t)
        return None

    def fire(self, state: PostState, key: int, at: int) -> list[FeatureValue]:
        if self.observed_wm is None or at > self.observed_wm:
            self.observed_wm = at
        w = state.window
        if key >= 0:
            out = w.fire(self.spec, at, POST, str(key))
        else:  # an author's profile views: no post windows
            w.advance(at)
            out = []
        # Forget ids past the dedup horizon (whole slides: an id is kept up to a
        # slide longer) and pairings past the window retention.
        state.forget_before(self.spec.bucket(at - self.params.dedup_horizon_ms))
        state.drop_pairs_before(at - self.spec.retention)
        return out

    def next_timer(self, state: PostState) -> int | None:
        """When the key needs the watermark next: its next change point, or when what it
        remembers (dedup ids, unpaired likes) expires, whichever comes first."""
        times = []
        window = state.window.next_timer(self.spec)
        if window is not None:
            times.append(window)
        if state.seen_by_bucket:
            times.append(self._boundary(state, min(state.seen_by_bucket) + self.spec.slide
                                        + self.params.dedup_horizon_ms))
        if state.pairs_min is not None:
            times.append(self._boundary(state, state.pairs_min + self.spec.retention))
        return min(times) if times else None

    def _boundary(self, state: PostState, expiry: int) -> int:
        # The first slide boundary after the expiry and after the last fired
        # timer, so keys fire together and every timer makes progress.
        slide = self.spec.slide
        return max(self.spec.bucket(expiry) + slide, (state.window.known_wm or 0) + slide)

    @staticmethod
    def empty(state: PostState) -> bool:
        return (state.window.idle() and not state.seen_by_bucket and not state.likes
                and not state.unlikes)


# -- author stage ---------------------------------------------------------------------------


class AuthorStage:
    """7-day engagement rate and post count of one author."""

    new_state = WindowState

    def __init__(self, params: FeatureParams):
        self.spec = params.author_spec

    def apply(self, state: WindowState, author: int, item: Item) -> list[FeatureValue]:
        entity = str(author)
        kind = item.kind
        if kind == POST_CREATED:
            return state.add(self.spec, A_POSTS, item.t, AUTHOR, entity)
        if kind == VIEW:
            return state.add(self.spec, A_VIEWS, item.t, AUTHOR, entity)
        if kind == CANCEL:
            return state.cancel(self.spec, A_ENGAGED, item.like_t, item.t, AUTHOR, entity)
        if kind in (LIKE, COMMENT, SHARE, SAVE):
            return state.add(self.spec, A_ENGAGED, item.t, AUTHOR, entity)
        return []  # profile views: affinity only

    def fire(self, state: WindowState, author: int, at: int) -> list[FeatureValue]:
        return state.fire(self.spec, at, AUTHOR, str(author))

    def next_timer(self, state: WindowState) -> int | None:
        return state.next_timer(self.spec)

    @staticmethod
    def empty(state: WindowState) -> bool:
        return state.idle()


# -- viewer stage: decayed affinities -------------------------------------------------------


def decay_add(entry: list | None, w: float, t: int, half_life_ms: int) -> list:
    """Add weight ``w`` at ``t`` to a ``[score, valid_at, events]`` entry (new list if None).

    A newer ``t`` decays the score to ``t`` first and moves ``valid_at``; an
    older or equal one adds its weight decayed to ``valid_at``. ``events``
    counts what was added (the value's version).
    """
    if entry is None:
        return [w, t, 1]
    score, ref, events = entry
    if t > ref:
        entry[0] = score * math.exp2(-(t - ref) / half_life_ms) + w
        entry[1] = t
    else:
        entry[0] = score + w * math.exp2(-(ref - t) / half_life_ms)
    entry[2] = events + 1
    return entry


#: Affinities below this are rounding left over from cancelled likes: emitted as 0.
AFFINITY_EPSILON = 1e-12


def _clean(score: float) -> float:
    return score if score > AFFINITY_EPSILON else 0.0


class ViewerState(_Slots):
    """Keyed state of one viewer: ``[score, valid_at, events]`` per author and per media
    type, and which of them changed since the last emission."""

    __slots__ = ("authors", "media", "dirty_authors", "dirty_media", "flush_at")

    def __init__(self):
        self.authors: dict[int, list] = {}
        self.media: dict[int, list] = {}
        self.dirty_authors: set[int] = set()
        self.dirty_media: set[int] = set()
        self.flush_at: int | None = None


class ViewerStage:
    """Time-decayed viewer-author and viewer-media affinity, emitted once per slide.

    A changed pair is emitted when the watermark passes the end of the slide
    its event fell in (one value per pair per slide, however many events).
    """

    new_state = ViewerState

    def __init__(self, params: FeatureParams):
        self.params = params

    def apply(self, state: ViewerState, item: Item) -> None:
        p = self.params
        hl = p.half_life_ms
        if item.kind == CANCEL:
            # The like's weight as of the unlike, removed at the unlike's time:
            # exact, since decayed sums are linear.
            w = -p.weights.get(LIKE, 0.0) * math.exp2(-(item.t - item.like_t) / hl)
        else:
            w = p.weight(item)
        if w == 0.0:
            return
        state.authors[item.author] = decay_add(state.authors.get(item.author), w, item.t, hl)
        state.dirty_authors.add(item.author)
        if item.media >= 0 and item.kind != PROFILE_VIEW:
            state.media[item.media] = decay_add(state.media.get(item.media), w, item.t, hl)
            state.dirty_media.add(item.media)
        flush = item.t - item.t % p.slide_ms + p.slide_ms
        if state.flush_at is None or flush < state.flush_at:
            state.flush_at = flush

    def fire(self, state: ViewerState, viewer: int, at: int) -> list[FeatureValue]:
        out = []
        if state.flush_at is not None and state.flush_at <= at:
            for author in sorted(state.dirty_authors):
                score, ref, version = state.authors[author]
                out.append(FeatureValue(VIEWER_AUTHOR, f"{viewer}:{author}", AFFINITY,
                                        _clean(score), ref, version))
            for media in sorted(state.dirty_media):
                score, ref, version = state.media[media]
                out.append(FeatureValue(VIEWER_MEDIA, f"{viewer}:{MEDIA_BY_CODE[media].value}",
                                        AFFINITY, _clean(score), ref, version))
            state.dirty_authors.clear()
            state.dirty_media.clear()
            state.flush_at = None
        cutoff = at - self.params.affinity_ttl_ms
        for table in (state.authors, state.media):
            for key in [k for k, e in table.items() if e[1] < cutoff]:
                del table[key]
        return out

    def next_timer(self, state: ViewerState) -> int | None:
        if state.flush_at is not None:
            return state.flush_at
        refs = [e[1] for table in (state.authors, state.media) for e in table.values()]
        if not refs:
            return None
        # Rounded up to a day: expiries share timer times, which bounded re-runs
        # (the watermark jumps to the end) fire one time at a time.
        expiry = min(refs) + self.params.affinity_ttl_ms
        return expiry - expiry % DAY_MS + DAY_MS

    @staticmethod
    def empty(state: ViewerState) -> bool:
        return not state.authors and not state.media and state.flush_at is None


# -- shards ----------------------------------------------------------------------------------


def shard_of(key: int, shards: int) -> int:
    """The shard of an entity key (a multiplicative hash: consecutive ids spread out)."""
    return (key * 2654435761) % 4294967296 % shards


class Shard(_Slots):
    """Keyed state of one shard of a stage: its entities' states and when each needs the
    watermark next (``agenda``: time -> keys), so one timer serves the whole shard.

    Keying by shard rather than by entity: a runner pays per key and bundle (on
    Prism, a state round trip and a bundle per key), far more than the Python
    that updates an entity, so a few dozen shards per stage carry the same
    work in far fewer, larger units.
    """

    __slots__ = ("entities", "agenda", "scheduled", "timer_at")

    def __init__(self):
        self.entities: dict = {}
        self.agenda: dict[int, set] = {}
        self.scheduled: dict = {}
        self.timer_at: int | None = None  # the shard's pending timer (set by the DoFn)

    def schedule(self, key, at: int | None) -> None:
        """``key`` needs a timer at ``at`` (None: none)."""
        old = self.scheduled.get(key)
        if old == at:
            return
        if old is not None:
            keys = self.agenda[old]
            keys.discard(key)
            if not keys:
                del self.agenda[old]
        if at is None:
            self.scheduled.pop(key, None)
        else:
            self.scheduled[key] = at
            self.agenda.setdefault(at, set()).add(key)

    def due(self, at: int) -> list:
        """The keys whose time is ``at``, sorted (taken off the agenda)."""
        keys = sorted(self.agenda.pop(at, ()))
        for key in keys:
            del self.scheduled[key]
        return keys

    def next_time(self) -> int | None:
        return min(self.agenda) if self.agenda else None


# -- top followers ------------------------------------------------------------------


def follower_scores(values: Sequence[FeatureValue],
                    half_life_ms: int) -> dict[int, dict[int, tuple[float | None, int]]]:
    """``{author: {viewer: (rank or None, write stamp)}}`` of the viewer-author affinities
    among ``values``, the newest per pair (None: no positive affinity, leave the ranking)."""
    newest: dict[tuple[int, int], FeatureValue] = {}
    for v in values:
        if v.entity_type != VIEWER_AUTHOR:
            continue
        viewer, author = split_pair(v.entity_id)
        pair = (int(author), viewer)
        held = newest.get(pair)
        if held is None or (v.write_stamp_us, v.value) > (held.write_stamp_us, held.value):
            newest[pair] = v
    out: dict[int, dict[int, tuple[float | None, int]]] = {}
    for (author, viewer), v in newest.items():
        rank = engagement_rank(v.value, v.valid_at_ms, half_life_ms)
        out.setdefault(author, {})[viewer] = (rank, v.write_stamp_us)
    return out
