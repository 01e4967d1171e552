"""The slot layout of post and author features (stores.redis.slots), without Redis."""
from __future__ import annotations

import struct

import pytest

from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES
from schemas.keys import KeyLayout, layout_tag
from stores.redis.slots import EMPTY_STAMP, merge_args, pack, unpack, fields

NAMES = ("like_1h", "view_1h", "engagement_rate_1h")


def test_a_string_reads_back_per_slot_and_none_is_all_empty():
    blob = pack(NAMES, {"view_1h": (4.0, 17), "engagement_rate_1h": (float("nan"), 18)})
    assert len(blob) == 3 * 16
    values, stamps = unpack([blob, None], len(NAMES))
    assert values.shape == stamps.shape == (2, 3)
    assert stamps.tolist() == [[EMPTY_STAMP, 17, 18], [EMPTY_STAMP] * 3]
    assert values[0, 1] == 4.0 and values[0, 2] != values[0, 2]  # a stored NaN stays NaN
    got = fields(NAMES, blob)
    assert list(got) == ["view_1h", "engagement_rate_1h"] and got["view_1h"] == (4.0, 17)
    assert fields(NAMES, None) == {}


def test_a_string_of_another_size_is_refused():
    with pytest.raises(ValueError, match="not 3 slots of 16"):
        unpack([pack(NAMES, {})[:-1]], len(NAMES))
    with pytest.raises(ValueError, match="not 3 slots"):
        unpack([pack(NAMES + ("x",), {})], len(NAMES))


def test_merge_arguments_name_slots_by_index_and_refuse_unknown_names():
    args = merge_args(NAMES, 1000, {"engagement_rate_1h": (0.5, 9), "like_1h": (2.0, 8)})
    assert args[:2] == [1000, 3]
    assert [(args[i], struct.unpack("<dq", args[i + 1])) for i in range(2, len(args), 2)] == \
        [(2, (0.5, 9)), (0, (2.0, 8))]
    with pytest.raises(ValueError, match="not one of"):
        merge_args(NAMES, 1000, {"like_7d": (1.0, 1)})


def test_keys_name_their_layout():
    keys = KeyLayout("fb")
    assert layout_tag(POST_FEATURES) in keys.post_features(3)
    assert layout_tag(AUTHOR_FEATURES) in keys.author_features(3)
    assert layout_tag(MEDIA_TYPES) in keys.content_affinity(3)
    assert layout_tag(POST_FEATURES) != layout_tag(POST_FEATURES[1:] + POST_FEATURES[:1])
