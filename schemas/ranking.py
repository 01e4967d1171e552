"""Typed records of the ranking pipeline: candidates, refresh triggers and outcomes.

The ranked feed itself (``RankedEntry``, ``RankedFeed``) is in
``schemas.ranked``, shared with serving; these records stay inside ranking:

* ``Candidate``: a post a user's ranked feed may hold (pushed into the home
  feed, or pulled from a followed celebrity's timeline), with what ranking
  needs without a feature read (author, creation time, media type).
* ``Trigger``: one event's claim that a user's candidates or features changed;
  the debouncer collects them per user into one ``RefreshRequest``.
* ``RefreshOutcome``: what one refresh wrote (the composite's output).
* ``ClaimedRefreshes``: users taken off the pending-refresh queue together, with
  their waiting triggers (``encode_triggers`` / ``decode_pending``: the queue's
  text form of triggers).
* ``PostTable``, ``CandidateColumns``, ``BatchFeatures``: a whole refresh
  batch as columns (stored post metadata, every user's candidates, features).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

#: ``RankedFeed.model_version`` of a feed ranked by recency because no model
#: passed evaluation yet (or the current one could not be used). Serving can
#: tell a recency feed from a model's by this value.
RECENCY_VERSION = "recency"

# Trigger reasons.
POST_CREATED = "post_created"    # a followee posted: a new candidate
POST_DELETED = "post_deleted"    # a followee deleted a post: a candidate is gone
FOLLOW_CHANGED = "follow"        # the user followed someone: candidates change
UNFOLLOW_CHANGED = "unfollow"    # the user unfollowed someone: candidates change
ENGAGED = "engaged"              # the user engaged: their affinities moved
VIRAL = "viral"                  # a candidate's engagement jumped: its features moved
REASONS: tuple[str, ...] = (POST_CREATED, POST_DELETED, FOLLOW_CHANGED, UNFOLLOW_CHANGED,
                            ENGAGED, VIRAL)


class Candidate(NamedTuple):
    """A post that may enter a user's ranked feed.

    ``pulled`` is True for a post of a followed account above the push
    threshold read from its timeline (not pushed into the home feed).
    """

    post_id: int
    author_id: int
    created_at: int
    media_type: str
    pulled: bool = False


class Trigger(NamedTuple):
    """``user_id``'s ranked feed should be refreshed because of an event at ``event_time``.

    For post triggers ``post_id``/``author_id``/``created_at``/``media_type``
    describe the post (so a refresh can include a post the fan-out has not
    written yet, or drop one it has not removed yet); for follow and unfollow
    triggers ``author_id`` is the followee (the refresh waits until the
    fan-out has applied the edge); for viral triggers ``post_id`` and
    ``author_id`` name the post; 0/"" otherwise.
    """

    user_id: int
    event_time: int
    reason: str
    post_id: int = 0
    author_id: int = 0
    created_at: int = 0
    media_type: str = ""


class RefreshRequest(NamedTuple):
    """One debounced refresh of ``user_id``'s ranked feed.

    ``changed_at_ms``: event time of the earliest change it covers (for the
    change-to-refresh latency); ``new_posts``: posts created meanwhile (added
    as candidates if still live); ``deleted``: post ids deleted meanwhile
    (never ranked); ``triggers``: how many events it coalesces; ``reread``:
    posts whose features must be read from the store, not a recent copy (their
    engagement just jumped).
    """

    user_id: int
    changed_at_ms: int
    new_posts: tuple[Candidate, ...] = ()
    deleted: frozenset = frozenset()
    triggers: int = 1
    reread: frozenset = frozenset()


class RefreshOutcome(NamedTuple):
    """What one refresh did: ``entries`` ranked posts written under ``model_version``
    at ``generated_at_ms`` (wall clock), for a change at ``changed_at_ms`` (event time)."""

    user_id: int
    model_version: str
    entries: int
    candidates: int
    changed_at_ms: int
    generated_at_ms: int
    triggers: int = 1


# -- the pending-refresh queue's text form of triggers ---------------------------------
#
# The queue (``stores.redis.refresh_queue``) keeps each pending user's triggers as
# text, one line per trigger: a reason code, then the fields a refresh needs.
# ``#<seq>`` lines head each batch of lines one ``add`` appended, so a finished
# refresh can drop exactly the lines it read.

_CODES = {POST_CREATED: "c", POST_DELETED: "d", FOLLOW_CHANGED: "f", UNFOLLOW_CHANGED: "u",
          ENGAGED: "e", VIRAL: "v"}
_REASONS = {code: reason for reason, code in _CODES.items()}


def encode_triggers(triggers: Sequence[Trigger]) -> str:
    """The lines of ``triggers`` (their ``user_id`` is the queue's field, not repeated)."""
    out = []
    for t in triggers:
        code = _CODES[t.reason]
        if t.reason in (POST_CREATED, POST_DELETED):
            out.append(f"{code}{t.event_time},{t.post_id},{t.author_id},{t.created_at},"
                       f"{t.media_type}\n")
        elif t.reason in (FOLLOW_CHANGED, UNFOLLOW_CHANGED):
            out.append(f"{code}{t.event_time},{t.author_id}\n")
        elif t.reason == VIRAL:
            out.append(f"{code}{t.event_time},{t.post_id},{t.author_id}\n")
        else:
            out.append(f"{code}{t.event_time}\n")
    return "".join(out)


def decode_pending(user_id: int, text: str) -> tuple[int, list[Trigger]]:
    """``(highest seq, triggers)`` of a user's queued text (``encode_triggers`` lines
    under ``#<seq>`` heads); ``(0, [])`` for none. ValueError on a malformed line."""
    seq = 0
    triggers: list[Trigger] = []
    for line in text.split("\n"):
        if not line:
            continue
        code, rest = line[0], line[1:]
        if code == "#":
            seq = max(seq, int(rest))
            continue
        reason = _REASONS.get(code)
        if reason is None:
            raise ValueError(f"unknown trigger code in {line!r}")
        f = rest.split(",")
        if reason in (POST_CREATED, POST_DELETED):
            triggers.append(Trigger(user_id, int(f[0]), reason, int(f[1]), int(f[2]), int(f[3]),
                                    f[4]))
        elif reason in (FOLLOW_CHANGED, UNFOLLOW_CHANGED):
            triggers.append(Trigger(user_id, int(f[0]), reason, author_id=int(f[1])))
        elif reason == VIRAL:
            triggers.append(Trigger(user_id, int(f[0]), reason, int(f[1]), int(f[2])))
        else:
            triggers.append(Trigger(user_id, int(f[0]), reason))
    return seq, triggers


class ClaimedRefreshes(NamedTuple):
    """Users one shard of the pending-refresh queue handed out together (``claimed_at_ms``,
    wall clock): ``users[i]`` with its queued trigger text ``payloads[i]``
    (``decode_pending``) and its follow-gate wait ``waits[i]`` (``"<since ms>,<checks>"``,
    or ``""`` when it has not waited). One element of the ranking pipeline."""

    shard: int
    claimed_at_ms: int
    users: Sequence[int]
    payloads: Sequence[str]
    waits: Sequence[str]


class PostTable(NamedTuple):
    """Stored metadata of many posts, as arrays sorted by ``post_id``: ``state`` 1
    for a live post, 2 for a deletion tombstone (author and creation time kept);
    ``media`` the media type strings (object array)."""

    post_id: np.ndarray
    author_id: np.ndarray
    created_at: np.ndarray
    media: np.ndarray
    state: np.ndarray


class CandidateColumns(NamedTuple):
    """The candidates of a batch of users, one row per candidate: ``users[i]``'s
    rows are ``offsets[i]:offsets[i + 1]``, newest first (``Candidate``'s fields
    as arrays). ``unstored``: the row is a post only a trigger carried, the store
    holding no metadata of it (the fan-out has not written it yet); None: unknown.
    ``posts`` and ``post_at``: the distinct post ids, sorted, and each row's index
    in them (``np.unique(post_id, return_inverse=True)``, which the selection
    works out anyway); None: not given."""

    users: tuple[int, ...]
    offsets: np.ndarray
    post_id: np.ndarray
    author_id: np.ndarray
    created_at: np.ndarray
    media: np.ndarray
    pulled: np.ndarray
    unstored: np.ndarray | None = None
    posts: np.ndarray | None = None
    post_at: np.ndarray | None = None

    def distinct_posts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(posts, post_at)``: the distinct post ids, sorted, and each row's index in them."""
        if self.posts is not None and self.post_at is not None:
            return self.posts, self.post_at
        return np.unique(self.post_id, return_inverse=True)

    def of(self, i: int) -> list[Candidate]:
        """``users[i]``'s candidates as ``Candidate`` records."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return [Candidate(int(p), int(au), int(c), str(m), bool(pl)) for p, au, c, m, pl in zip(
            self.post_id[a:b], self.author_id[a:b], self.created_at[a:b], self.media[a:b],
            self.pulled[a:b])]


class BatchFeatures(NamedTuple):
    """The online features of a whole refresh batch as arrays
    (``OnlineFeatureStore.hydrate_batch``).

    ``posts``: one row per requested post, columns ``schemas.features.POST_FEATURES``
    (NaN: missing or expired); ``authors``: likewise per requested author with
    ``AUTHOR_FEATURES``; ``affinity``: per requested (viewer, author) pair, the
    viewer's affinity decayed to the read time (0.0: none); ``content``: one row
    per requested viewer, columns ``MEDIA_TYPES``, decayed (0.0: none).
    """

    posts: np.ndarray
    authors: np.ndarray
    affinity: np.ndarray
    content: np.ndarray
