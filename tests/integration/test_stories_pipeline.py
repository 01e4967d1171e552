"""``MaterializeStories`` on Prism with ``TestStream`` (watermark under test control)
against the real Redis and Cassandra: event batches mixing publishes and views,
a delete taking its story out of the expiry index, the expiry timer firing when
the watermark reaches ``expires_at`` (and not before), and views after expiry
ignored without recreating state.

Event times sit minutes ahead of the wall clock, so nothing here expires by
the wall clock while the test runs: every removal is the timer's doing.

Run: ``.venv/bin/python -m pytest tests/integration/test_stories_pipeline.py``
"""
from __future__ import annotations

import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from infra.install import prism_binary
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.stories import CassandraStoryStore
from pipelines.stories import MaterializeStories
from domain.stories import StoryPolicy
from stores.cassandra.session import migrate
from schemas.events import MediaType, StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from schemas.records import EventBatch
from stores.config import StoreConfig

pytestmark = pytest.mark.integration

MIN = 60_000
PUBLISHED, VIEWED, DELETED = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def event(kind: StoryEventKind, story: int, author: int, at: int, viewer: int | None = None,
          expires: int | None = None) -> StoryEvent:
    return StoryEvent(f"{kind.value}-{story}-{viewer}-{at}", at, kind, story, author,
                      viewer_id=viewer, created_at=at if kind is PUBLISHED else None,
                      expires_at=expires, media_type=MediaType.VIDEO if kind is PUBLISHED else None)


def batched(events: list[StoryEvent]) -> list[TimestampedValue]:
    """The events as one ``EventBatch`` (as one partition poll), at its oldest event's time."""
    n = len(events)
    batch = EventBatch("story-events", 0, events, [e.event_time for e in events],
                       list(range(n)), [None] * n, [b""] * n)
    return [TimestampedValue(batch, min(e.event_time for e in events) / 1000)]


def _id_actions(outcomes):
    return [(o.event_id, o.action) for o in outcomes]


def _expired_at(expired, ts=beam.DoFn.TimestampParam):
    return expired.story_id, expired.expires_at, ts.micros // 1000


def test_publish_view_delete_and_expiry_at_the_watermark(stack, redis_client, key_prefix,
                                                         cassandra_session, keyspace):
    migrate(cassandra_session, keyspace)
    t = (int(time.time() * 1000) // 1000 + 60) * 1000
    s1, s2, s3 = 101, 102, 103
    exp1, exp2, exp3 = t + 10 * MIN, t + 20 * MIN, t + 15 * MIN
    first = [event(PUBLISHED, s1, 1, t, expires=exp1), event(PUBLISHED, s2, 1, t, expires=exp2),
             event(PUBLISHED, s3, 2, t, expires=exp3),
             event(VIEWED, s1, 1, t + 1000, viewer=7), event(VIEWED, s2, 1, t + 2000, viewer=7)]
    delete_s2 = event(DELETED, s2, 1, t + 5000)
    just_before = event(VIEWED, s1, 1, exp1 - 1000, viewer=9)        # before the timer fires
    after = [event(VIEWED, s1, 1, exp1 - 30_000, viewer=8),          # s1 already removed
             event(VIEWED, s3, 2, exp3 + 1000, viewer=8),            # viewed after s3 expired
             event(PUBLISHED, s1, 1, t, expires=exp1)]               # s1 redelivered
    stream = (TestStream()
              .add_elements(batched(first))
              .advance_watermark_to((t + 5000) / 1000)
              .add_elements(batched([delete_s2]))
              .advance_watermark_to((exp1 - 1) / 1000)
              .add_elements(batched([just_before]))
              .advance_watermark_to(exp1 / 1000)
              .add_elements(batched(after))
              .advance_watermark_to_infinity())
    stores = StoreConfig(stack.redis_url, key_prefix, stack.cassandra_host, stack.cassandra_port, keyspace)
    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
                               "--environment_type=LOOPBACK", "--streaming"])
    with beam.Pipeline(options=options) as p:
        results = p | stream | MaterializeStories(
            stores, StoryPolicy(grace_ms=10 * MIN), max_batches=100)
        assert_that(results.outcomes | "IdAction" >> beam.FlatMap(_id_actions), equal_to([
            (first[0].event_id, "published"), (first[1].event_id, "published"),
            (first[2].event_id, "published"), (first[3].event_id, "viewed"),
            (first[4].event_id, "viewed"), (delete_s2.event_id, "deleted"),
            (just_before.event_id, "viewed"),
            (after[0].event_id, "view_expired"), (after[1].event_id, "view_late"),
            (after[2].event_id, "tombstoned"),
        ]), label="Outcomes")
        # s1 fires at its expiry, s3 when the stream ends; s2 was deleted: nothing to expire.
        assert_that(results.expired | "WithTimestamp" >> beam.Map(_expired_at),
                    equal_to([(s1, exp1, exp1), (s3, exp3, exp3)]), label="Expired")

    keys = KeyLayout(key_prefix)
    dump = RedisFeedStore(redis_client, keys).dump()
    assert dump == {
        keys.story(s1): {"author_id": "1", "expires_at": str(exp1), "removed": "expired"},
        keys.story(s2): {"author_id": "1", "expires_at": str(exp2), "removed": "deleted"},
        keys.story(s3): {"author_id": "2", "expires_at": str(exp3), "removed": "expired"},
    }
    durable = CassandraStoryStore(cassandra_session, keyspace).dump()
    assert all(rows == [] for rows in durable.values()), durable
