"""Typed records of ranked feeds, shared by the ranking pipeline (writer) and serving (reader).

A ranked feed is a user's candidate posts in the order the ranking job chose
(model score, then diversity re-ranking), with the model version that scored
it and the time it was generated. ``stores.ranked`` stores and
reads it in Redis and Cassandra.
"""
from __future__ import annotations

from typing import NamedTuple


class RankedEntry(NamedTuple):
    """One ranked post. ``score`` is the ranking's score of the post; the rank is
    the entry's position in its feed, which need not follow ``score`` (diversity
    re-ranking may move a lower score up)."""

    post_id: int
    author_id: int
    score: float


class RankedFeed(NamedTuple):
    """A user's whole ranked feed: ``entries`` in rank order (best first)."""

    user_id: int
    entries: tuple[RankedEntry, ...]
    model_version: str
    generated_at_ms: int


class RankedPage(NamedTuple):
    """A slice of a ranked feed: ``entries`` are ranks ``start .. start+len-1``
    (0-based) of the version generated at ``generated_at_ms``, which holds
    ``total`` entries. ``requested_version`` is False when the version asked
    for was gone and this is the current one instead."""

    entries: tuple[RankedEntry, ...]
    start: int
    total: int
    model_version: str
    generated_at_ms: int
    requested_version: bool = True
