"""The features pipeline's elements: decoded batches as aggregation input, and their coder."""
from __future__ import annotations

import numpy as np

from domain.features import KIND_CODES, MEDIA_CODES, POST_CREATED, FeatureParams
from pipelines.features import KICK, Blobs, SourcedItemsCoder, params_fingerprint, sourced_items
from schemas.codec import WireCodec
from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind
from schemas.records import EventBatch


def _batch(events, topic, first_offset=40):
    codec = WireCodec()
    return EventBatch(topic, 1, events, [e.event_time + 1 for e in events],
                      list(range(first_offset, first_offset + len(events))),
                      [e.key for e in events], [codec.encode(e, topic) for e in events])


def test_engagement_batches_become_columns_with_their_source():
    events = [EngagementEvent("a", 10, EngagementKind.VIEW, 7, 45, 100, MediaType.VIDEO, 900),
              EngagementEvent("b", 11, EngagementKind.PROFILE_VIEW, 8, 45)]
    sourced, ignored = sourced_items(_batch(events, "engagement-events"))
    assert ignored == 0 and (sourced.first, sourced.last) == (40, 41)
    it = sourced.items
    assert it.kind.tolist() == [KIND_CODES[EngagementKind.VIEW],
                                KIND_CODES[EngagementKind.PROFILE_VIEW]]
    video = MEDIA_CODES[MediaType.VIDEO]
    assert (it.post.tolist(), it.media.tolist(), it.dwell.tolist()) == ([100, -1], [video, -1],
                                                                        [900, -1])
    assert it.ids == [b"a", b"b"] and sourced.offsets.tolist() == [40, 41]
    assert WireCodec().decode(sourced.values[1]) == events[1] and sourced.keys[0] == b"100"


def test_only_created_posts_are_items_but_every_offset_is_spanned():
    events = [PostEvent("c", 5, PostEventKind.CREATED, 9, 3, 5, MediaType.PHOTO),
              PostEvent("d", 6, PostEventKind.DELETED, 9, 3, 5)]
    sourced, ignored = sourced_items(_batch(events, "post-events"))
    assert ignored == 1 and (sourced.first, sourced.last) == (40, 41)
    assert sourced.items.kind.tolist() == [POST_CREATED] and sourced.offsets.tolist() == [40]
    deleted_only, ignored = sourced_items(_batch(events[1:], "post-events"))
    assert deleted_only is None and ignored == 1


def test_the_coder_round_trips_columns_ids_keys_and_bytes():
    events = [EngagementEvent(f"e{i}", 10 + i, EngagementKind.LIKE, i, 4, 100 + i,
                              MediaType.PHOTO) for i in range(5)]
    sourced, _ = sourced_items(_batch(events, "engagement-events"))
    sourced = sourced._replace(keys=Blobs.of([b"k", None, b"", b"x" * 300, None]))
    coder = SourcedItemsCoder()
    back = coder.decode(coder.encode(sourced))
    assert (back.topic, back.partition, back.first, back.last) == \
        (sourced.topic, 1, 40, 44)
    for a, b in zip(back.items.arrays(), sourced.items.arrays()):
        assert np.array_equal(a, b)
    assert back.items.ids == sourced.items.ids
    assert back.keys.tolist() == [b"k", None, b"", b"x" * 300, None]
    assert back.values.tolist() == sourced.values.tolist()
    assert coder.decode(coder.encode(KICK)).topic == ""


def test_a_snapshot_is_tied_to_the_parameters_it_was_made_with():
    assert params_fingerprint(FeatureParams()) == params_fingerprint(FeatureParams())
    assert params_fingerprint(FeatureParams()) != params_fingerprint(
        FeatureParams(slide_ms=60_000))
    assert params_fingerprint(FeatureParams()) != params_fingerprint(
        FeatureParams(weights={**FeatureParams().weights, 0: 5.0}))
