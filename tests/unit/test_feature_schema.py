"""Feature names, stamps, decay and the online store's stored form (no Redis)."""
from __future__ import annotations

import pytest

from schemas.features import (
    AUTHOR_FEATURES,
    MAX_VERSION,
    POST_FEATURES,
    FeatureTTLs,
    FeatureValue,
    check_entity,
    decay,
    pair_id,
    split_pair,
    write_stamp_us,
)


def test_names_match_the_contract():
    assert POST_FEATURES == (
        "like_1h", "comment_1h", "share_1h", "save_1h", "view_1h",
        "like_24h", "comment_24h", "share_24h", "save_24h", "view_24h",
        "engagement_rate_1h", "engagement_rate_24h")
    assert AUTHOR_FEATURES == ("engagement_rate_7d", "posts_7d")
    check_entity("viewer_media", "affinity")
    with pytest.raises(ValueError):
        check_entity("post", "affinity")


def test_write_stamp_orders_by_time_then_version():
    assert write_stamp_us(5, 0) < write_stamp_us(5, 1) < write_stamp_us(6, 0)
    assert write_stamp_us(5, MAX_VERSION + 10) == write_stamp_us(5, MAX_VERSION) < write_stamp_us(6)
    assert FeatureValue("post", "1", "like_1h", 1.0, 5, 2).write_stamp_us == 5002
    with pytest.raises(ValueError):
        write_stamp_us(5, -1)


def test_pairs_round_trip():
    assert split_pair(pair_id(7, 45)) == (7, "45")
    assert split_pair(pair_id(7, "REEL")) == (7, "REEL")
    with pytest.raises(ValueError):
        split_pair("7")


def test_decay_halves_per_half_life_and_never_grows():
    assert decay(8.0, 0, 20, half_life_ms=10) == pytest.approx(2.0)
    assert decay(8.0, 20, 0, half_life_ms=10) == 8.0


def test_ttls_validate_and_look_up():
    ttls = FeatureTTLs(post_ms=1, author_ms=2, viewer_author_ms=3, viewer_media_ms=4)
    assert [ttls.of(t) for t in ("post", "author", "viewer_author", "viewer_media")] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        FeatureTTLs(post_ms=0)
    with pytest.raises(ValueError):
        ttls.of("story")


def test_feature_columns_round_trip_and_keep_the_newest_per_entity_and_name():
    from schemas.features import FeatureColumns

    values = [FeatureValue("post", "12", "like_1h", 2.0, 10, 3),
              FeatureValue("post", "12", "like_1h", 5.0, 20, 0),  # later: kept
              FeatureValue("post", "12", "like_1h", 4.0, 20, 0),  # same stamp, smaller
              FeatureValue("viewer_author", "5:7", "affinity", 0.25, 30, 4),
              FeatureValue("viewer_media", "5:VIDEO", "affinity", 1.5, 10, 2),
              FeatureValue("viewer_media", "5:VIDEO", "affinity", 1.0, 10, 1)]
    columns = FeatureColumns.of(values)
    assert columns.values() == values
    assert sorted(columns.newest().values(), key=repr) == sorted(
        [values[1], values[3], values[4]], key=repr)
    assert FeatureColumns.concat([columns, FeatureColumns.empty()]).values() == values
