"""The batch aggregator (``domain.feature_aggregator``) against the per-event reference stages
of ``domain.features``, against hand counts, and through export/restore."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.feature_aggregator import AppliedOffsets, FeatureAggregator, ItemColumns
from domain.features import (
    COMMENT,
    LIKE,
    POST_CREATED,
    PROFILE_VIEW,
    SAVE,
    SHARE,
    TO_AUTHOR_STAGE,
    TO_VIEWER_STAGE,
    UNLIKE,
    VIEW,
    AuthorStage,
    FeatureParams,
    FirstStage,
    Item,
    Shard,
    ViewerStage,
    first_stage_key,
)
from schemas.features import FeatureColumns

M = 60_000
H = 60 * M
T0 = 1_700_002_800_000  # an hour boundary


# -- drivers ---------------------------------------------------------------------------


def reference(batches, ticks, params):
    """The per-event stages, wired as the previous pipeline did (forwards applied at once,
    each stage's shard firing its agenda in time order up to each tick)."""
    stages = {"first": FirstStage(params), "author": AuthorStage(params),
              "viewer": ViewerStage(params)}
    shards = {name: Shard() for name in stages}
    out = []

    def reschedule(name, key):
        stage, shard = stages[name], shards[name]
        state = shard.entities[key]
        if stage.empty(state):
            del shard.entities[key]
            shard.schedule(key, None)
        else:
            shard.schedule(key, stage.next_timer(state))

    def apply(name, key, value):
        stage, shard = stages[name], shards[name]
        state = shard.entities.get(key)
        if state is None:
            state = shard.entities[key] = stage.new_state()
        if name == "first":
            outcome = stage.apply(state, *value)
            out.extend(outcome.features)
            for fwd in outcome.forward:
                if fwd.kind in TO_AUTHOR_STAGE:
                    apply("author", fwd.author, fwd)
                if fwd.kind in TO_VIEWER_STAGE:
                    apply("viewer", fwd.viewer, fwd)
        elif name == "author":
            out.extend(stage.apply(state, key, value))
        else:
            stage.apply(state, value)
        reschedule(name, key)

    for batch, until in zip(batches, ticks):
        for event_id, item in batch:
            apply("first", first_stage_key(item), (event_id, item))
        for name, stage in stages.items():
            shard = shards[name]
            while shard.agenda and min(shard.agenda) <= until:
                when = min(shard.agenda)
                for key in shard.due(when):
                    out.extend(stage.fire(shard.entities[key], key, when))
                    reschedule(name, key)
    return out


def columns(batch) -> ItemColumns:
    return ItemColumns.of(*zip(*[(i.kind, i.t, i.viewer, i.author, i.post, i.media, i.dwell)
                                 for _, i in batch]), [eid.encode() for eid, _ in batch]) \
        if batch else ItemColumns.empty()


def aggregate(batches, ticks, params, agg=None):
    agg = agg or FeatureAggregator(params)
    out, too_late = [], []
    for batch, until in zip(batches, ticks):
        applied = agg.apply(columns(batch))
        out.append(applied.values)
        too_late += [batch[i][0] for i in applied.too_late]
        out.append(agg.fire(until))
    return FeatureColumns.concat(out), too_late, agg


def as_of(values):
    """``{(type, id, name): [(valid_at, version, value)]}`` sorted: what readers see."""
    table = {}
    for v in values:
        table.setdefault((v.entity_type, v.entity_id, v.name), []).append(
            (v.valid_at_ms, v.version, v.value))
    return {k: sorted(rows) for k, rows in table.items()}


def value_at(rows, t):
    best = None
    for row in rows:
        if row[0] <= t:
            best = row
    return None if best is None else best[2]


def same_values(expected, got) -> list:
    """Where the two emissions disagree on the value a reader sees at any time."""
    a, b = as_of(expected), as_of(got)
    problems = []
    for key in sorted(set(a) | set(b)):
        times = sorted({r[0] for r in a.get(key, []) + b.get(key, [])})
        for t in times:
            x, y = value_at(a.get(key, []), t), value_at(b.get(key, []), t)
            if (x is None) != (y is None) or (x is not None and x != pytest.approx(
                    y, rel=1e-9, abs=1e-12)):
                problems.append((key, t, x, y))
                break
    return problems


# -- workloads -------------------------------------------------------------------------


def workload(seed: int, n: int = 300, disorder: int = 0, posts: int = 5, viewers: int = 7,
             authors: int = 3, span: int = 5 * H):
    """Created posts, then engagements of every kind (duplicates, unlikes, profile
    views) over ``span``, in time order shuffled by up to ``disorder``."""
    rng = random.Random(seed)
    events = [(f"p{p}", Item(POST_CREATED, T0 - 10 * M + p * M, -1, p % authors, p, p % 4, -1))
              for p in range(posts)]
    kinds = [VIEW] * 5 + [LIKE] * 3 + [COMMENT, SHARE, SAVE, PROFILE_VIEW, UNLIKE, UNLIKE]
    for i in range(n):
        kind, post, viewer = rng.choice(kinds), rng.randrange(posts), 100 + rng.randrange(viewers)
        t = T0 + rng.randrange(span)
        if kind == PROFILE_VIEW:
            item = Item(kind, t, viewer, post % authors, -1, -1, -1)
        else:
            item = Item(kind, t, viewer, post % authors, post, post % 4,
                        rng.randrange(20_000) if kind == VIEW else -1)
        events.append((f"e{i}", item))
        if rng.random() < 0.05:
            events.append((f"e{i}", item))  # a duplicate
    events.sort(key=lambda e: e[1].t + (rng.randrange(disorder) if disorder else 0))
    return events


def split(events, size: int, slide: int, end: int):
    """Batches of ``size`` and, after each, a watermark at the slide boundary below the
    next batch's earliest event; the last one far past every window."""
    batches, ticks = [], []
    for i in range(0, len(events), size):
        batches.append(events[i:i + size])
        later = events[i + size:i + 2 * size]
        t = min(e.t for _, e in later) if later else end
        ticks.append(t - t % slide)
    ticks[-1] = end
    return batches, ticks


PARAMS = FeatureParams(allowed_lateness_ms=3 * H, dedup_horizon_ms=4 * H)
END = T0 + 30 * 24 * H


@pytest.mark.parametrize("seed", range(12))
def test_same_values_as_the_per_event_stages(seed):
    events = workload(seed, disorder=40 * M if seed % 2 else 0)
    batches, ticks = split(events, 1 + seed * 7, PARAMS.slide_ms, END)
    expected = reference(batches, ticks, PARAMS)
    got, too_late, _ = aggregate(batches, ticks, PARAMS)
    assert too_late == []  # the disorder stays within the lateness
    assert len(got) > 100
    assert same_values(expected, got.values()) == []


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.sampled_from([0, 20 * M, 90 * M]))
def test_same_values_for_any_batching(seed, size, disorder):
    events = workload(seed, n=120, disorder=disorder)
    batches, ticks = split(events, size, PARAMS.slide_ms, END)
    got, _, _ = aggregate(batches, ticks, PARAMS)
    assert same_values(reference(batches, ticks, PARAMS), got.values()) == []


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_export_and_restore_continue_exactly(cut):
    """A state exported mid-stream and restored gives the same values as one never
    interrupted (what a restart from a snapshot relies on)."""
    events = workload(3, n=400, disorder=30 * M)
    batches, ticks = split(events, 13, PARAMS.slide_ms, END)
    whole, _, _ = aggregate(batches, ticks, PARAMS)
    first, _, agg = aggregate(batches[:cut], ticks[:cut], PARAMS)
    restored = FeatureAggregator.restore(PARAMS, agg.export())
    assert restored.sizes() == agg.sizes()
    assert (restored.fired, restored.next_timer()) == (agg.fired, agg.next_timer())
    rest, _, _ = aggregate(batches[cut:], ticks[cut:], PARAMS, agg=restored)
    resumed = FeatureColumns.concat([first, rest])
    assert len(resumed) == len(whole)
    for name in ("entity_type", "entity", "other", "name", "valid_at_ms", "version", "value"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name)), name


# -- by hand ----------------------------------------------------------------------------


def item(kind, minute, viewer=7, post=100, author=45, media=0, dwell=-1):
    return Item(kind, T0 + minute * M, viewer, author, post, media, dwell)


def by_name(values, entity_type="post", entity="100"):
    return {(v.name, v.valid_at_ms): v.value for v in values
            if v.entity_type == entity_type and v.entity_id == entity}


def test_a_repeated_id_counts_once_within_a_batch_and_across_batches():
    agg = FeatureAggregator(FeatureParams())
    first = agg.apply(columns([("a", item(LIKE, 1)), ("a", item(LIKE, 1)), ("b", item(VIEW, 2))]))
    again = agg.apply(columns([("a", item(LIKE, 1))]))
    assert (first.counts["duplicate"], first.counts["counted"]) == (1, 2)
    assert again.counts["duplicate"] == 1
    values = by_name(agg.fire(T0 + 5 * M).values())
    assert values[("like_1h", T0 + 5 * M)] == 1.0 and values[("view_1h", T0 + 5 * M)] == 1.0


def test_too_late_events_are_returned_by_position_and_counted_nowhere():
    agg = FeatureAggregator(FeatureParams())  # lateness 1 h
    agg.apply(columns([("a", item(LIKE, 1))]))
    agg.fire(T0 + 3 * H)
    applied = agg.apply(columns([("b", item(VIEW, 2 * 60 + 30)), ("c", item(LIKE, 2)),
                                 ("d", item(LIKE, 182))]))
    assert applied.too_late == [1]
    assert applied.counts["too_late"] == 1 and applied.counts["late"] == 1
    # The late view re-emits the passed window end it changes, version up.
    late = [v for v in applied.values.values() if v.name == "view_1h"]
    assert [(v.valid_at_ms, v.value) for v in late] == [(T0 + 155 * M, 1.0)]


def test_an_unlike_before_its_like_cancels_it_and_the_affinity():
    params = FeatureParams()
    agg = FeatureAggregator(params)
    agg.apply(columns([("u", item(UNLIKE, 3))]))
    applied = agg.apply(columns([("l", item(LIKE, 1))]))
    assert applied.counts["unlikes_unmatched"] == 0
    values = agg.fire(T0 + 2 * H).values()
    posts = by_name(values)
    assert posts[("like_1h", T0 + 5 * M)] == 0.0  # cancelled from minute 3 on: never seen
    affinity = [v for v in values if v.entity_type == "viewer_author"]
    assert [(v.entity_id, v.valid_at_ms, v.version) for v in affinity] == \
        [("7:45", T0 + 3 * M, 2)]
    assert affinity[0].value == 0.0


def test_a_profile_view_moves_the_affinity_only():
    agg = FeatureAggregator(FeatureParams())
    agg.apply(columns([("v", item(PROFILE_VIEW, 1, post=-1, media=-1))]))
    values = agg.fire(T0 + 10 * M).values()
    assert [(v.entity_type, v.entity_id, v.value) for v in values] == \
        [("viewer_author", "7:45", 1.0)]


def test_state_is_forgotten_past_every_horizon():
    params = FeatureParams(affinity_ttl_ms=2 * 24 * H)
    agg = FeatureAggregator(params)
    agg.apply(columns([("a", item(LIKE, 1)), ("b", item(VIEW, 2, dwell=5_000))]))
    assert agg.next_timer() == T0 + 5 * M
    agg.fire(T0 + 10 * 24 * H)
    assert {k: v for k, v in agg.sizes().items() if v} == {}
    assert agg.next_timer() is None


# -- applied offsets ---------------------------------------------------------------------


def test_applied_offsets_merge_cover_and_restart_after_the_first_gap():
    offsets = AppliedOffsets()
    offsets.add("t", 0, 10, 19)
    offsets.add("t", 0, 20, 29)
    offsets.add("t", 0, 40, 49)  # 30..39 not seen yet
    offsets.add("t", 1, 0, 4)
    assert offsets.restart() == {("t", 0): 30, ("t", 1): 5}
    covered = offsets.covered("t", 0, np.array([9, 10, 29, 30, 45, 50]))
    assert covered.tolist() == [False, True, True, False, True, False]
    offsets.add("t", 0, 30, 39)
    assert offsets.restart()[("t", 0)] == 50
    assert AppliedOffsets.from_json(offsets.to_json()).ranges == offsets.ranges


def test_the_json_of_applied_offsets_does_not_move_with_later_batches():
    """A snapshot serializes it on its own thread while batches go on being applied: the
    snapshot must name only the offsets its state holds, or a restart skips the rest."""
    offsets = AppliedOffsets()
    offsets.add("t", 0, 0, 999)
    snapshot = offsets.to_json()
    offsets.add("t", 0, 1000, 1999)  # the next batch extends the last range in place
    assert AppliedOffsets.from_json(snapshot).restart() == {("t", 0): 1000}


def test_a_gap_that_outlives_a_snapshot_interval_is_filled():
    """A record the source dead-lettered never arrives: its gap must not hold restarts."""
    offsets = AppliedOffsets()
    offsets.add("t", 0, 0, 9)
    offsets.add("t", 0, 11, 20)  # offset 10 was dead-lettered at decode
    offsets.settle()
    assert offsets.restart() == {("t", 0): 10}
    offsets.add("t", 0, 21, 30)
    offsets.settle()
    assert offsets.restart() == {("t", 0): 31}


def test_a_restored_state_wants_the_watermark_when_the_original_did():
    """Times only the agenda knows (a profile view's flush): restored with it."""
    agg = FeatureAggregator(FeatureParams())
    agg.apply(columns([("v", item(PROFILE_VIEW, 1, post=-1, media=-1))]))
    restored = FeatureAggregator.restore(FeatureParams(), agg.export())
    assert restored.next_timer() == agg.next_timer() == T0 + 5 * M
    assert [v.entity_id for v in restored.fire(T0 + 5 * M).values()] == ["7:45"]
