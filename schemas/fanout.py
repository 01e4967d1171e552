"""Typed record of the fan-out: what applying one post or follow event did.

``stores.fanout.FeedFanout`` returns it, the fan-out pipeline emits it (one per
event) and counts it. Times are ms since the epoch.
"""
from __future__ import annotations

import dataclasses


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
