"""Typed records of the story state: what the stories pipeline writes and serving reads.

``StoryMeta`` is one story as stored; ``TrayEntry`` (with its ``TrayStory``
items) is one author's row of a viewer's story tray; ``StoryOutcome`` is what
applying one event did; ``StoryExpired`` is what the expiry step emits when it
removes a story, ``ExpiryRound`` one firing of its timer. Times are ms since
the epoch.
"""
from __future__ import annotations

import dataclasses


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
