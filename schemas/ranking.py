"""Typed records of the ranking pipeline: candidates, refresh triggers and outcomes.

The ranked feed itself (``RankedEntry``, ``RankedFeed``) is in
``schemas.ranked``, shared with serving; these records stay inside ranking:

* ``Candidate``: a post a user's ranked feed may hold (pushed into the home
  feed, or pulled from a followed celebrity's timeline), with what ranking
  needs without a feature read (author, creation time, media type).
* ``Trigger``: one event's claim that a user's candidates or features changed;
  the debouncer collects them per user into one ``RefreshRequest``.
* ``RefreshOutcome``: what one refresh wrote (the composite's output).
"""
from __future__ import annotations

from typing import NamedTuple

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
REASONS: tuple[str, ...] = (POST_CREATED, POST_DELETED, FOLLOW_CHANGED, UNFOLLOW_CHANGED,
                            ENGAGED)


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
    fan-out has applied the edge); 0/"" otherwise.
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
    (never ranked); ``triggers``: how many events it coalesces.
    """

    user_id: int
    changed_at_ms: int
    new_posts: tuple[Candidate, ...] = ()
    deleted: frozenset = frozenset()
    triggers: int = 1


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
