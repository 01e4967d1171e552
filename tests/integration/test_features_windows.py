"""AggregateEngagementFeatures on TestStream (Prism): on time, late, too late, duplicate, unlike.

Expected values are counted by hand from the events below, which arrive as
decoded batches (one per event, as a Kafka source would emit them with their
wire bytes). Outputs are read "as of" a time the way the stores and the log
read them: per (entity, name) the value with the newest valid_at <= time, the
highest version of it. The same test runs with the state in memory and in
Beam state (the Flink default).
"""
from __future__ import annotations

import math

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue

from infra.install import prism_binary
from pipelines.features import AggregateEngagementFeatures, StateConfig
from domain.features import FeatureParams
from schemas.codec import WireCodec
from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind
from schemas.records import EventBatch

pytestmark = pytest.mark.integration

M = 60_000
T0 = 1_700_002_800_000  # an hour boundary
HALF_LIFE = 7 * 24 * 60 * M


def _e(event_id, minute, kind, viewer, post=100, author=45, dwell=None):
    return EngagementEvent(event_id, T0 + minute * M, kind, viewer, author, post,
                           MediaType.PHOTO, dwell)


K = EngagementKind
ON_TIME = [
    _e("e1", 1, K.VIEW, 7, dwell=10_000),
    _e("e2", 2, K.LIKE, 7),
    _e("e3", 3, K.COMMENT, 8),
    _e("e2", 2, K.LIKE, 7),  # duplicate event_id
    _e("e4", 12, K.VIEW, 8),  # no dwell: counts as a view, no affinity
    _e("p200-1", 1, K.LIKE, 9, post=200),
]
POST = PostEvent("post-1", T0 + 5 * M, PostEventKind.CREATED, 300, 45, T0 + 5 * M)
AFTER_30_MIN = [
    _e("e5", 4, K.LIKE, 9),  # late (its window end 5 was emitted), within the lateness
    _e("e6", 16, K.UNLIKE, 7),  # cancels e2 from minute 16 on
]
AFTER_3_H = [_e("p200-late", 2, K.LIKE, 10, post=200)]  # 2 + 60 < 65: too late


def _stream():
    codec = WireCodec()
    offsets = {}

    def batch(e):
        """``e`` as the source would deliver it: a one-event batch with its wire bytes."""
        offset = offsets[e.TOPIC] = offsets.get(e.TOPIC, -1) + 1
        return EventBatch(e.TOPIC, 0, [e], [e.event_time], [offset], [e.key],
                          [codec.encode(e, e.TOPIC)])

    def at(events):
        return [TimestampedValue(batch(e), e.event_time / 1000) for e in events]

    return (BeamTestStream()
            .advance_watermark_to(T0 / 1000)
            .add_elements(at(ON_TIME + [POST]))
            .advance_watermark_to((T0 + 30 * M) / 1000)
            .add_elements(at(AFTER_30_MIN))
            # Late elements hold no watermark: the stage may see the next advance
            # before them, so it stays within their lateness (4 + 60 > 50).
            .advance_watermark_to((T0 + 50 * M) / 1000)
            .advance_watermark_to((T0 + 180 * M) / 1000)
            .add_elements(at(AFTER_3_H))
            .advance_watermark_to_infinity())


def as_of(values, time_ms):
    """{(entity_type, entity_id, name): value} as a reader at ``time_ms`` would see it."""
    best = {}
    for v in values:
        if v.valid_at_ms > time_ms:
            continue
        key = (v.entity_type, v.entity_id, v.name)
        rank = (v.valid_at_ms, v.version, v.value)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, v.value)
    return {k: value for k, (_, value) in best.items()}


def _check_features(values):
    import math as m

    def post(t_min, post_id="100"):
        got = as_of(values, T0 + t_min * M)
        return {name: got[("post", post_id, name)]
                for name in ("view_1h", "like_1h", "comment_1h", "engagement_rate_1h",
                             "like_24h", "view_24h")}

    assert post(10) == {"view_1h": 1, "like_1h": 2, "comment_1h": 1,
                        "engagement_rate_1h": 3.0, "like_24h": 2, "view_24h": 1}, post(10)
    # e2 cancelled at 16, e4 viewed at 12.
    assert post(20) == {"view_1h": 2, "like_1h": 1, "comment_1h": 1,
                        "engagement_rate_1h": 1.0, "like_24h": 1, "view_24h": 2}, post(20)
    assert post(70) == {"view_1h": 1, "like_1h": 0, "comment_1h": 0,
                        "engagement_rate_1h": 0.0, "like_24h": 1, "view_24h": 2}, post(70)
    # Post 200: the too-late like never counts.
    assert [v.value for v in values
            if v.entity_id == "200" and v.name == "like_1h" and v.value > 1] == []
    assert as_of(values, T0 + 10 * M)[("post", "200", "like_1h")] == 1
    # A created post gets its (zero) features; the author counts it.
    assert as_of(values, T0 + 10 * M)[("post", "300", "like_24h")] == 0
    author = as_of(values, T0 + 60 * M)
    assert author[("author", "45", "engagement_rate_7d")] == 1.5  # (e3 + e5 + p200-1) / 2 views
    assert author[("author", "45", "posts_7d")] == 1
    final = as_of(values, T0 + 10**10)
    assert final[("author", "45", "posts_7d")] == 0  # the post left the 7-day window
    assert final[("post", "100", "like_24h")] == 0  # every window drained

    def decayed(*terms):
        return sum(w * m.exp2(-(end - t) * M / HALF_LIFE) for w, t, end in terms)

    def close(a, b):
        return abs(a - b) < 1e-9

    aff = {k: v for k, v in final.items() if k[2] == "affinity"}
    assert close(aff[("viewer_author", "7:45", "affinity")], decayed((0.5, 1, 16))), aff
    assert close(aff[("viewer_media", "7:PHOTO", "affinity")], decayed((0.5, 1, 16))), aff
    assert close(aff[("viewer_author", "8:45", "affinity")], 2.0), aff
    assert close(aff[("viewer_author", "9:45", "affinity")], decayed((1, 1, 4), (1, 4, 4))), aff
    assert ("viewer_author", "10:45", "affinity") not in aff
    valid = {(v.entity_id, v.valid_at_ms) for v in values if v.entity_type == "viewer_author"}
    assert ("7:45", T0 + 16 * M) in valid  # valid from the unlike on


def _check_dead_letters(letters):
    # The original record: its offset (the 9th engagement of the stream), key and bytes.
    assert [(d.reason, d.step, d.topic, d.partition, d.offset) for d in letters] == \
        [("too_late", "features", "engagement-events", 0, 8)], letters
    event = WireCodec().decode(letters[0].value)
    assert event.event_id == "p200-late" and event.post_id == 200
    assert letters[0].key == b"200"


@pytest.mark.parametrize("store", ["memory", "beam"])
def test_windows_on_time_late_too_late_duplicate_unlike(stack, store):
    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
                               "--environment_type=LOOPBACK", "--streaming"])
    with beam.Pipeline(options=options) as p:
        out = (p | _stream()
               | AggregateEngagementFeatures(FeatureParams(half_life_ms=HALF_LIFE),
                                             StateConfig(store)))
        assert_that(out.features, _check_features, label="Features")
        assert_that(out.dead_letters, _check_dead_letters, label="DeadLetters")


def test_as_of_picks_newest_valid_then_highest_version():
    from schemas.features import FeatureValue

    values = [FeatureValue("post", "1", "like_1h", 1.0, 10, 0),
              FeatureValue("post", "1", "like_1h", 2.0, 10, 1),
              FeatureValue("post", "1", "like_1h", 5.0, 20, 0)]
    assert as_of(values, 15) == {("post", "1", "like_1h"): 2.0}
    assert as_of(values, 9) == {}
    assert math.isclose(as_of(values, 20)[("post", "1", "like_1h")], 5.0)
