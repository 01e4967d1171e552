"""Feature values computed straight from a list of events (the end-to-end tests' oracle).

Written from the rules in ``docs/pipelines/features.md``, not from the code: every
count is a filter over the whole event list. Events are assumed on time
(nothing too late), produced in event-time order.
"""
from __future__ import annotations

import dataclasses
import math

from schemas.events import EngagementEvent, EngagementKind, PostEvent

K = EngagementKind
ENGAGING = (K.LIKE, K.COMMENT, K.SHARE, K.SAVE)
WEIGHTS = {K.LIKE: 1.0, K.COMMENT: 2.0, K.SHARE: 3.0, K.SAVE: 2.0, K.VIEW: 0.5,
           K.PROFILE_VIEW: 1.0}
DWELL_REF_MS = 10_000


@dataclasses.dataclass
class Oracle:
    engagements: list[EngagementEvent]
    posts: list[PostEvent]
    half_life_ms: int
    cancels: dict[str, int] = dataclasses.field(default_factory=dict)  # like event_id -> unlike t

    @classmethod
    def of(cls, events, half_life_ms: int) -> "Oracle":
        seen, engagements, posts = set(), [], []
        for e in sorted(events, key=lambda e: e.event_time):
            if e.event_id in seen:
                continue
            seen.add(e.event_id)
            (posts if isinstance(e, PostEvent) else engagements).append(e)
        oracle = cls(engagements, posts, half_life_ms)
        open_likes: dict[tuple[int, int], list[EngagementEvent]] = {}
        for e in engagements:
            if e.kind is K.LIKE:
                open_likes.setdefault((e.viewer_id, e.post_id), []).append(e)
            elif e.kind is K.UNLIKE:
                likes = open_likes.get((e.viewer_id, e.post_id))
                if likes:
                    oracle.cancels[likes.pop().event_id] = e.event_time
        return oracle

    def _likes_at(self, events, end: int) -> int:
        return sum(1 for e in events if e.kind is K.LIKE
                   and not (e.event_id in self.cancels and self.cancels[e.event_id] < end))

    def post(self, post_id: int, end: int, width: int) -> dict[str, float]:
        """Counts and rate of the window ``[end - width, end)`` of one post."""
        inside = [e for e in self.engagements
                  if e.post_id == post_id and end - width <= e.event_time < end]
        counts = {k: sum(1 for e in inside if e.kind is k) for k in
                  (K.COMMENT, K.SHARE, K.SAVE, K.VIEW)}
        like = self._likes_at(inside, end)
        engaged = like + counts[K.COMMENT] + counts[K.SHARE] + counts[K.SAVE]
        return {"like": like, "comment": counts[K.COMMENT], "share": counts[K.SHARE],
                "save": counts[K.SAVE], "view": counts[K.VIEW],
                "rate": engaged / counts[K.VIEW] if counts[K.VIEW] else 0.0}

    def author(self, author_id: int, end: int, width: int) -> dict[str, float]:
        inside = [e for e in self.engagements
                  if e.author_id == author_id and end - width <= e.event_time < end]
        engaged = self._likes_at(inside, end) + sum(
            1 for e in inside if e.kind in (K.COMMENT, K.SHARE, K.SAVE))
        views = sum(1 for e in inside if e.kind is K.VIEW)
        posts = sum(1 for p in self.posts
                    if p.author_id == author_id and end - width <= p.event_time < end)
        return {"engagement_rate_7d": engaged / views if views else 0.0, "posts_7d": posts}

    def _weight(self, e: EngagementEvent) -> float:
        w = WEIGHTS.get(e.kind, 0.0)
        if e.kind is K.VIEW:
            w *= min(e.dwell_ms or 0, DWELL_REF_MS) / DWELL_REF_MS
        return w

    def affinity(self, viewer: int, author: int | None = None,
                 media: str | None = None) -> tuple[float, int] | None:
        """``(score as of valid_at, valid_at)`` of a viewer-author or viewer-media pair."""
        terms = []  # (weight, time it counts from), cancels as negative likes
        times = []
        for e in self.engagements:
            if e.viewer_id != viewer or e.kind is K.UNLIKE:
                continue
            if author is not None and e.author_id != author:
                continue
            if media is not None and (e.media_type is None or e.media_type.value != media
                                      or e.kind is K.PROFILE_VIEW):
                continue
            w = self._weight(e)
            if w == 0.0:
                continue
            terms.append((w, e.event_time))
            times.append(e.event_time)
            if e.event_id in self.cancels:
                terms.append((-w, e.event_time))
                times.append(self.cancels[e.event_id])
        if not times:
            return None
        at = max(times)
        score = sum(w * math.exp2(-(at - t) / self.half_life_ms) for w, t in terms)
        return max(score, 0.0), at
