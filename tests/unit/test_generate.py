"""Unit tests of the synthetic workload (``jobs/workload.py``) and ``feedbeam generate``.

Small graphs keep the whole module to a few seconds; no Kafka here (see
``tests/integration/test_generate_kafka.py``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import numpy as np
import pytest

from jobs import generate
from infra.errors import UserFacingError
from jobs.generate import (
    JsonLinesSink,
    TokenBucket,
    config_from_args,
    parse_duration,
    parse_start,
    pump,
    read_workload_file,
)
from jobs.workload import MEDIA_TYPES, Workload, WorkloadConfig
from schemas.codec import WireCodec
from schemas.events import (
    STORY_TTL_MS,
    EngagementEvent,
    EngagementKind,
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
    StoryEvent,
    StoryEventKind,
    TOPICS,
)

START = 1_714_564_800_000  # 2024-05-01T12:00:00Z
HOUR = 3_600_000

# Many posts per user so that a 2 h span of 2,000 users has enough engagement
# to measure the planted preferences.
SMALL = WorkloadConfig(start_ms=START, seed=7, users=2_000, avg_following=40,
                       celebrities=3, push_threshold=400, duration_ms=2 * HOUR,
                       posts_per_user_day=4.0, stories_per_user_day=2.0,
                       churn_per_user_day=2.0)

TINY = dataclasses.replace(SMALL, users=600, avg_following=20, push_threshold=150)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return Workload(SMALL)


@pytest.fixture(scope="module")
def events(workload) -> list:
    return list(workload.events())


def _of(events, record_type):
    return [e for _, _, e in events if isinstance(e, record_type)]


def _wire(events, codec=WireCodec()) -> list[tuple[str, bytes, bytes]]:
    return [(t, k, codec.encode(e)) for t, k, e in events]


# ------------------------------------------------------------ determinism


def test_same_config_gives_identical_bytes(workload, events):
    again = list(Workload(SMALL).events())
    assert again == events
    assert _wire(again[::5]) == _wire(events[::5])
    assert list(workload.events()) == events  # events() is repeatable


def test_different_seed_gives_different_events():
    one, two = (list(Workload(dataclasses.replace(TINY, seed=s)).events()) for s in (1, 2))
    assert _wire(one[:1000]) != _wire(two[:1000])
    assert not {e.event_id for _, _, e in one} & {e.event_id for _, _, e in two}


def test_event_ids_and_post_ids_unique(events):
    ids = [e.event_id for _, _, e in events]
    assert len(set(ids)) == len(ids)
    created = [p.post_id for p in _of(events, PostEvent) if p.kind is PostEventKind.CREATED]
    assert len(set(created)) == len(created)
    published = [s.story_id for s in _of(events, StoryEvent)
                 if s.kind is StoryEventKind.PUBLISHED]
    assert len(set(published)) == len(published)


def test_keys_are_the_events_keys_and_topics_match(events):
    for topic, key, event in events:
        assert topic == event.TOPIC and key == event.key


# ------------------------------------------------------------ graph


def test_in_degree_is_heavy_tailed_with_celebrities_above_threshold():
    w = Workload(WorkloadConfig(start_ms=START, users=3_000, avg_following=150,
                                celebrities=3, push_threshold=1_500))
    followers = w.follower_counts()
    celebrities = np.array(w.celebrities) - 1
    assert len(celebrities) == 3
    assert (followers[celebrities] > 1_500).all()
    ordinary = np.delete(followers, celebrities)
    assert (ordinary <= 1_500).all()  # exactly the celebrities cross the threshold
    median = np.median(ordinary)
    assert 40 <= median <= 300
    assert np.mean((ordinary >= 10) & (ordinary < 1_000)) > 0.95
    assert ordinary.max() / median > 5  # a heavy tail, not a narrow bell
    assert np.percentile(ordinary, 99) / median > 4
    assert 140 <= w.following_counts().mean() <= 160


def test_graph_events_come_first_and_match_the_graph(workload, events):
    graph = events[:workload.edge_count]
    assert all(isinstance(e, FollowEvent) and e.kind is FollowKind.FOLLOW for _, _, e in graph)
    assert all(START - HOUR <= e.event_time < START for _, _, e in graph)
    edges = {(e.follower_id, e.followee_id) for _, _, e in graph}
    assert len(edges) == workload.edge_count
    author = workload.celebrities[0]
    assert {f for f, a in edges if a == author} == set(workload.followers(author).tolist())


def test_follow_churn_includes_unfollow_then_refollow(workload, events):
    run = [e for e in _of(events, FollowEvent) if e.event_time >= START]
    kinds = collections.Counter(e.kind for e in run)
    assert kinds[FollowKind.FOLLOW] > 0 and kinds[FollowKind.UNFOLLOW] > 0
    unfollowed = {}
    refollowed = 0
    for e in run:
        edge = (e.follower_id, e.followee_id)
        if e.kind is FollowKind.UNFOLLOW:
            assert workload.affinity(*edge) > 0  # an edge of the initial graph
            unfollowed[edge] = e.event_time
        elif edge in unfollowed:
            assert e.event_time > unfollowed[edge]
            refollowed += 1
        else:
            assert workload.affinity(*edge) == 0.0  # a new edge
    assert refollowed > 0


# ------------------------------------------------------------ time and references


def test_event_time_order_per_topic_within_span(events):
    last = collections.defaultdict(lambda: -1)
    for topic, _, e in events:
        assert e.event_time >= last[topic], topic
        last[topic] = e.event_time
        assert e.event_time < SMALL.end_ms
    assert set(last) == set(TOPICS)


def test_engagements_reference_live_posts_of_their_author(events):
    created = {p.post_id: p for p in _of(events, PostEvent) if p.kind is PostEventKind.CREATED}
    deleted = {p.post_id: p.event_time for p in _of(events, PostEvent)
               if p.kind is PostEventKind.DELETED}
    assert deleted and set(deleted) <= set(created)
    engagements = _of(events, EngagementEvent)
    kinds = collections.Counter(e.kind for e in engagements)
    assert set(kinds) == set(EngagementKind)
    for e in engagements:
        if e.kind is EngagementKind.PROFILE_VIEW:
            assert e.post_id is None
            continue
        post = created[e.post_id]
        assert e.author_id == post.author_id and e.media_type is post.media_type
        assert post.created_at <= e.event_time < deleted.get(e.post_id, SMALL.end_ms)
        assert (e.dwell_ms is not None) == (e.kind is EngagementKind.VIEW)


def test_likes_precede_unlikes(events):
    liked = {}
    for e in _of(events, EngagementEvent):
        if e.kind is EngagementKind.LIKE:
            liked[(e.viewer_id, e.post_id)] = e.event_time
        elif e.kind is EngagementKind.UNLIKE:
            assert liked[(e.viewer_id, e.post_id)] <= e.event_time


def test_viewers_are_mostly_followers(workload, events):
    views = [e for e in _of(events, EngagementEvent) if e.kind is EngagementKind.VIEW]
    following = np.mean([workload.affinity(e.viewer_id, e.author_id) > 0 for e in views])
    assert 0.85 < following < 1.0


def test_stories_expire_after_24h_and_views_fall_in_their_life(workload, events):
    stories = _of(events, StoryEvent)
    published = {s.story_id: s for s in stories if s.kind is StoryEventKind.PUBLISHED}
    deleted = {s.story_id: s.event_time for s in stories if s.kind is StoryEventKind.DELETED}
    assert published and all(s.expires_at == s.created_at + STORY_TTL_MS
                             for s in published.values())
    views = [s for s in stories if s.kind is StoryEventKind.VIEWED]
    assert views
    for v in views:
        story = published[v.story_id]
        assert story.created_at < v.event_time < min(story.expires_at,
                                                     deleted.get(v.story_id, 1 << 62))
        assert v.author_id == story.author_id
        assert workload.affinity(v.viewer_id, v.author_id) > 0


# ------------------------------------------------------------ planted structure


def _engagement_by_view(events):
    """(viewer, post) -> engaged? for every VIEW, with the post's author and media."""
    engaged = {(e.viewer_id, e.post_id) for e in _of(events, EngagementEvent)
               if e.kind in (EngagementKind.LIKE, EngagementKind.COMMENT,
                             EngagementKind.SHARE, EngagementKind.SAVE)}
    return [(e, (e.viewer_id, e.post_id) in engaged) for e in _of(events, EngagementEvent)
            if e.kind is EngagementKind.VIEW]


def test_preferred_media_type_is_engaged_with_more(workload, events):
    by_rank = collections.defaultdict(list)
    for view, engaged in _engagement_by_view(events):
        prefs = [workload.preference(view.viewer_id, m) for m in MEDIA_TYPES]
        rank = sorted(prefs, reverse=True).index(workload.preference(view.viewer_id,
                                                                     view.media_type))
        by_rank[rank].append(engaged)
    rates = [np.mean(by_rank[r]) for r in range(4)]
    assert min(len(by_rank[r]) for r in range(4)) > 200
    assert rates[0] > 1.5 * rates[3], rates
    assert rates[0] > rates[1] > rates[3], rates


def test_close_followees_are_engaged_with_more_and_longer(workload, events):
    close, other = [], []
    for view, engaged in _engagement_by_view(events):
        target = close if workload.is_close(view.viewer_id, view.author_id) else other
        target.append((engaged, view.dwell_ms))
    assert len(close) > 100
    close_rate, other_rate = (np.mean([e for e, _ in g]) for g in (close, other))
    assert close_rate > 2 * other_rate, (close_rate, other_rate)
    assert np.median([d for _, d in close]) > 1.3 * np.median([d for _, d in other])


def test_ground_truth_accessors(workload):
    viewer = 1
    assert sum(workload.preference(viewer, m) for m in MediaType) == pytest.approx(1.0)
    followee = int(workload.following(viewer)[0])
    assert 0 < workload.affinity(viewer, followee) <= 1
    stranger = next(u for u in range(2, SMALL.users + 1)
                    if u not in set(workload.following(viewer).tolist()))
    assert workload.affinity(viewer, stranger) == 0.0
    for close in workload.close_followees(viewer).tolist():
        assert workload.is_close(viewer, close) and close not in workload.celebrities
    p_close = workload.engagement_probability(viewer, followee, MediaType.PHOTO)
    p_none = workload.engagement_probability(viewer, stranger, MediaType.PHOTO)
    assert p_close > p_none
    with pytest.raises(KeyError):
        workload.affinity(0, 1)


# ------------------------------------------------------------ lateness


def test_late_fraction_reorders_without_changing_content():
    events = list(Workload(TINY).events())
    late = list(Workload(dataclasses.replace(TINY, late_fraction=0.1,
                                             max_lateness_ms=60_000)).events())

    def content(evs):
        # Ids carry a digest of the config; the counters below it must match.
        def strip(d):
            d = {k: v for k, v in d.items() if k != "event_id"}
            for k in ("post_id", "story_id"):
                if d.get(k) is not None:
                    d[k] &= (1 << 36) - 1
            return json.dumps(d, sort_keys=True)
        return sorted(strip(e.to_avro()) for _, _, e in evs)

    assert content(late) == content(events)
    out_of_order, high = 0, collections.defaultdict(int)
    for topic, _, e in late:
        if e.event_time < high[topic]:
            out_of_order += 1
            assert high[topic] - e.event_time <= 60_000
        high[topic] = max(high[topic], e.event_time)
    assert out_of_order > 100


# ------------------------------------------------------------ the generate job


def test_file_round_trip_and_limit(tmp_path, events):
    path = tmp_path / "w.jsonl"
    sink = JsonLinesSink(path)
    counts = pump(iter(events), [sink], limit=5_000)
    sink.close()
    assert sum(counts.values()) == 5_000
    assert list(read_workload_file(path)) == events[:5_000]


def test_file_round_trip_all_event_types(tmp_path, events):
    sample = [next(x for x in events if isinstance(x[2], t))
              for t in (PostEvent, EngagementEvent, StoryEvent, FollowEvent)]
    sample += [x for x in events if isinstance(x[2], PostEvent)][:20]
    path = tmp_path / "w.jsonl"
    sink = JsonLinesSink(path)
    pump(sample, [sink])
    sink.close()
    assert list(read_workload_file(path)) == sample


def test_read_workload_file_names_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"topic": "nope", "key": "1", "event": {}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_workload_file(path))


class _FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = 0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.slept += 1
        self.now += seconds * 1.3 + 0.001  # sleeps overshoot, yet the rate must hold


def test_token_bucket_holds_rate_without_drift():
    clock = _FakeClock()
    bucket = TokenBucket(1_000, burst=50, clock=clock, sleep=clock.sleep)
    for _ in range(10_000):
        bucket.acquire()
        clock.now += 0.0001  # per-event work
    assert clock.now - 100.0 == pytest.approx(10.0, rel=0.01)
    assert clock.slept < 10_000 / 10  # sleeps are batched by the burst


def test_token_bucket_does_not_bank_idle_time_beyond_burst():
    clock = _FakeClock()
    bucket = TokenBucket(100, burst=10, clock=clock, sleep=clock.sleep)
    clock.now += 60.0  # idle for a minute
    start = clock.now
    for _ in range(110):
        bucket.acquire()
    assert 0.95 <= clock.now - start <= 1.2  # 100 paced events after a burst of 10


@pytest.mark.parametrize("text,ms", [("2h", 7_200_000), ("90m", 5_400_000),
                                     ("1h30m", 5_400_000), ("45s", 45_000),
                                     ("1500ms", 1_500), ("1d", 86_400_000), ("0.5h", 1_800_000)])
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "2", "2 hours", "h", "-1h"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserFacingError, match="bad duration"):
        parse_duration(text)


def test_parse_start():
    assert parse_start("2024-05-01T12:00:00Z") == START
    assert parse_start("2024-05-01T12:00:00") == START
    assert parse_start("2024-05-01T14:00:00+02:00") == START
    assert parse_start(str(START)) == START
    with pytest.raises(UserFacingError, match="--start"):
        parse_start("yesterday")


def _parse(argv):
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def test_config_from_args_defaults_end_now():
    config = config_from_args(_parse(["--duration", "2h"]), now_ms=START + 2 * HOUR)
    assert config.start_ms == START and config.end_ms == START + 2 * HOUR
    assert (config.users, config.avg_following, config.celebrities,
            config.push_threshold) == (20_000, 150, 3, 10_000)


@pytest.mark.parametrize("argv,message", [
    (["--users", "1"], "users"),
    (["--users", "100", "--avg-following", "80"], "avg-following"),
    (["--users", "5000"], "push threshold"),
    (["--late-fraction", "2"], "late-fraction"),
    (["--posts-per-day", "-1"], "posts-per-user-day"),
    (["--duration", "0s"], "duration"),
])
def test_config_from_args_rejects_bad_options(argv, message):
    with pytest.raises(UserFacingError, match=message):
        config_from_args(_parse(argv))


def test_cli_writes_file_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    args = _parse(["--users", "300", "--avg-following", "20", "--push-threshold", "100",
                   "--start", str(START), "--no-kafka", "--out", str(out),
                   "--count", "2000", "--rate", "0"])
    assert generate.run_generate(args, settings=None) == 0
    printed = capsys.readouterr().out
    assert "2,000 events" in printed
    # The graph comes first: all 2,000 are follows, counted on one line per run.
    assert "post-events 0, engagement-events 0, story-events 0, follow-events 2,000\n" in printed
    rows = list(read_workload_file(out))
    assert len(rows) == 2_000
    config = config_from_args(args)
    expected = list(Workload(config).events())[:2_000]
    assert rows == expected


def test_cli_rejects_negative_rate():
    with pytest.raises(UserFacingError, match="--rate"):
        generate.run_generate(_parse(["--rate", "-5", "--no-kafka"]), settings=None)


def test_read_workload_file_accepts_lines_without_optional_fields(tmp_path):
    path = tmp_path / "minimal.jsonl"
    path.write_text(
        '{"topic": "post-events", "key": "9", "event": {"event_id": "p", "event_time": 5, '
        '"kind": "CREATED", "post_id": 100, "author_id": 9, "created_at": 5, '
        '"media_type": "REEL"}}\n'
        '{"topic": "engagement-events", "key": "100", "event": {"event_id": "v", '
        '"event_time": 6, "kind": "VIEW", "viewer_id": 1, "author_id": 9, "post_id": 100}}\n'
        '{"topic": "engagement-events", "key": "9", "event": {"event_id": "pv", '
        '"event_time": 7, "kind": "PROFILE_VIEW", "viewer_id": 1, "author_id": 9}}\n'
        '{"topic": "story-events", "key": "9", "event": {"event_id": "s", "event_time": 8, '
        '"kind": "PUBLISHED", "story_id": 3, "author_id": 9}}\n')
    (_, _, post), (_, _, view), (_, _, profile), (_, _, story) = read_workload_file(path)
    assert post.media_type is MediaType.REEL and post.hashtags == () and post.caption_length == 0
    assert view.post_id == 100 and view.media_type is None and view.dwell_ms is None
    assert profile.post_id is None
    assert story.viewer_id is None and story.expires_at is None
    path.write_text('{"topic": "post-events", "key": "9", "event": {"event_id": "p"}}\n')
    with pytest.raises(ValueError, match="minimal.jsonl:1"):  # a required field is missing
        list(read_workload_file(path))
