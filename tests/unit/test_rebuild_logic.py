"""Pure pieces of ``feedbeam rebuild``: view selection, batching, the online TTL filter,
and durable story rows turned back into the events that wrote them."""
from __future__ import annotations

import pytest

from infra.errors import UserFacingError
from jobs.rebuild import VIEWS, parse_views
from stores.cassandra.features import online_fresh
from stores.cassandra.feeds import batched
from domain.stories import (
    HOUR_MS,
    StoryPolicy,
    publish_refusal,
    republished_event,
    reviewed_event,
    story_created_at,
    story_expiry,
)
from schemas.events import MediaType, StoryEventKind
from schemas.features import POST, FeatureValue
from schemas.stories import StoryMeta


def test_views_run_in_dependency_order_whatever_the_order_given():
    assert list(VIEWS)[-3:] == ["features", "stories", "ranked"]
    assert parse_views("ranked, stories,features,ranked") == ["features", "stories", "ranked"]
    assert parse_views(",".join(VIEWS)) == list(VIEWS)


@pytest.mark.parametrize("text, message", [
    ("feeds,nope,ranked,nope", "unknown view(s) nope; choose from graph, posts"),
    ("rank", "unknown view(s) rank"),
    (" , ", "names no view"),
])
def test_bad_view_names_are_refused_clearly(text, message):
    with pytest.raises(UserFacingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_views(text)


def test_batched_keeps_order_and_the_short_tail():
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))


def test_online_fresh_drops_what_an_online_read_would_not_serve():
    now, ttl = 1_700_000_000_000, 1000
    values = [FeatureValue(POST, "1", "like_1h", 1.0, now - ttl),       # the last readable ms
              FeatureValue(POST, "2", "like_1h", 1.0, now - ttl - 1),   # expired
              FeatureValue(POST, "3", "like_1h", 1.0, now + 5)]
    assert [v.entity_id for v in online_fresh(values, now, ttl)] == ["1", "3"]


def test_a_durable_story_republishes_as_it_was_written():
    policy = StoryPolicy()
    story = StoryMeta(7, 3, created_at=1_000_000, expires_at=1_000_000 + 24 * HOUR_MS,
                      media_type="VIDEO", views=4)
    event = republished_event(story, policy)
    assert event.kind is StoryEventKind.PUBLISHED and event.media_type is MediaType.VIDEO
    assert (event.story_id, event.author_id, story_created_at(event), story_expiry(event)) == \
        (7, 3, story.created_at, story.expires_at)
    assert publish_refusal(event, story.created_at + 1, policy) is None
    assert publish_refusal(event, story.expires_at, policy) == "expired"


def test_a_story_past_the_current_horizon_is_not_refused_again():
    # Accepted under a longer --max_story_life_h than the rebuild's policy.
    policy = StoryPolicy(max_life_ms=HOUR_MS)
    story = StoryMeta(8, 3, created_at=0, expires_at=10 * HOUR_MS, media_type=None)
    event = republished_event(story, policy)
    assert event.media_type is None and story_created_at(event) == 0
    assert publish_refusal(event, HOUR_MS, policy) is None


def test_a_durable_view_comes_back_as_its_event():
    event = reviewed_event(7, 3, 42, 5_000)
    assert (event.kind, event.story_id, event.author_id, event.viewer_id, event.event_time) == \
        (StoryEventKind.VIEWED, 7, 3, 42, 5_000)
