"""Training inputs without a running stack: a generated workload and its feature log.

    inputs = synthetic_training_inputs(args, "out/features")   # feedbeam train --synthetic
    feature_log_from_events(events, "out/features")             # feedbeam train --workload
    for value in replay_features(events, FeatureParams()): ...

``replay_features`` runs the features pipeline's own logic
(``domain.features``: ``FirstStage``, ``AuthorStage``,
``ViewerStage``) over events in arrival order, wired and timed the way
``pipelines.features`` wires its three keyed stateful stages: each key keeps
one timer, and a timer fires once the watermark reaches it. The watermark is
the newest event time seen so far (less the source's out-of-orderness): an
event behind it is late, and the first stage counts it or drops it as too
late by the pipeline's own lateness rule.
In event-time order nothing is late, so the values and their ``valid_at_ms``
are those the streaming job emits for the same events with no late data.
Nothing is computed differently for training: the log is what the pipeline
would have written.

``feature_log_from_events`` writes such a log for a whole workload (sorted by
event time first); ``synthetic_training_inputs`` generates a workload
(``jobs.workload`` or the realistic ``jobs.realistic``) and does both.
"""
from __future__ import annotations

import argparse
import heapq
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Sequence

# The stages' routing (TO_*_STAGE) is the one pipelines.features uses, so the replay
# cannot drift from it.
from domain.features import (
    TO_AUTHOR_STAGE,
    TO_VIEWER_STAGE,
    AuthorStage,
    FeatureParams,
    FirstStage,
    PostState,
    ViewerStage,
    ViewerState,
    WindowState,
    engagement_item,
    first_stage_key,
    post_item,
)
from schemas.events import EngagementEvent, FollowEvent, PostEvent, PostEventKind
from schemas.features import FeatureValue

if TYPE_CHECKING:
    import pyarrow as pa

    from jobs.realistic import ImpressionTruth

#: Workload start of ``--synthetic`` (fixed, so a run is reproducible): 2026-01-01T00:00Z.
SYNTHETIC_START_MS = 1_767_225_600_000


class _Stage:
    """One keyed stage: states by key, and each key's single pending timer."""

    def __init__(self, logic, new_state: Callable[[], object], index: int, timers: list):
        self.logic = logic
        self.new_state = new_state
        self.index = index
        self.states: dict[int, object] = {}
        self.timer_at: dict[int, int] = {}  # each key's pending timer
        self._timers = timers

    def state(self, key: int):
        s = self.states.get(key)
        if s is None:
            s = self.states[key] = self.new_state()
        return s

    def schedule(self, key: int, state) -> None:
        wanted = self.logic.next_timer(state)
        if wanted is not None and wanted != self.timer_at.get(key):
            self.timer_at[key] = wanted
            heapq.heappush(self._timers, (wanted, self.index, key))

    def fire(self, key: int, at: int) -> list[FeatureValue]:
        s = self.states.get(key)
        if s is None or self.timer_at.get(key) != at:
            return []  # a timer that was moved: stale
        del self.timer_at[key]
        out = self.logic.fire(s, key, at)
        if self.logic.empty(s):
            del self.states[key]
        else:
            self.schedule(key, s)
        return out


def replay_features(events: Iterable[object], params: FeatureParams = FeatureParams(),
                    max_out_of_orderness_ms: int = 0) -> Iterator[FeatureValue]:
    """The feature values the features pipeline emits for ``events`` (in arrival order).

    Post DELETED events and other topics are ignored, as the pipeline does.
    The watermark is the newest event time seen less
    ``max_out_of_orderness_ms`` (the Kafka source's ``--max_out_of_orderness_s``);
    events behind it are late: counted, or dropped when later than the allowed
    lateness (``FirstStage``). At the end, timers up to the newest event's
    time fire (later window ends would describe a time after the data).
    """
    timers: list = []
    first = _Stage(FirstStage(params), PostState, 0, timers)
    author = _Stage(AuthorStage(params), WindowState, 1, timers)
    viewer = _Stage(ViewerStage(params), ViewerState, 2, timers)
    stages = (first, author, viewer)

    def fire_until(t: int) -> Iterator[FeatureValue]:
        while timers and timers[0][0] <= t:
            at, index, key = heapq.heappop(timers)
            yield from stages[index].fire(key, at)

    newest = watermark = None
    for event in events:
        if type(event) is EngagementEvent:
            item = engagement_item(event)
        elif type(event) is PostEvent and event.kind is PostEventKind.CREATED:
            item = post_item(event)
        else:
            continue
        if newest is None or item.t > newest:
            newest = item.t
            watermark = newest - max_out_of_orderness_ms
            yield from fire_until(watermark)
        key = first_stage_key(item)
        state = first.state(key)
        outcome = first.logic.apply(state, event.event_id, item)
        if outcome.status in ("duplicate", "too_late"):
            continue
        yield from outcome.features
        first.schedule(key, state)
        for fwd in outcome.forward:
            if fwd.kind in TO_AUTHOR_STAGE:
                s = author.state(fwd.author)
                yield from author.logic.apply(s, fwd.author, fwd)
                author.schedule(fwd.author, s)
            if fwd.kind in TO_VIEWER_STAGE:
                s = viewer.state(fwd.viewer)
                viewer.logic.apply(s, fwd)
                viewer.schedule(fwd.viewer, s)
    if newest is not None:
        yield from fire_until(newest)


class TrainingInputs(NamedTuple):
    """Event tables for ``build_training_set`` (Avro field names), the follow edges for
    the social features (None when the input has none), and the true engagement
    probability of each impression when a generator knows it."""

    engagements: pa.Table
    posts: pa.Table
    follows: pa.Table | None = None
    truth: ImpressionTruth | None = None


def feature_log_from_events(events: Sequence[object], feature_log: str | Path) -> None:
    """Write the features pipeline's log for ``events`` under ``feature_log``: events
    sorted by event time (stable), so late events of a workload count where they
    belong, as the pipeline counts events within its allowed lateness."""
    from stores.files.feature_log import write_feature_log

    root = Path(feature_log)
    root.mkdir(parents=True, exist_ok=True)
    ordered = sorted(events, key=lambda e: e.event_time)
    batch: list[FeatureValue] = []
    for value in replay_features(ordered):
        batch.append(value)
        if len(batch) >= 500_000:
            write_feature_log(root, batch)
            batch = []
    write_feature_log(root, batch)


def training_inputs(events: Sequence[object], truth=None) -> TrainingInputs:
    """The event tables of ``events`` (engagements, posts, follows)."""
    from jobs.training_set import events_table

    return TrainingInputs(events_table(events, EngagementEvent), events_table(events, PostEvent),
                          events_table(events, FollowEvent), truth)


def synthetic_training_inputs(args: argparse.Namespace, feature_log: str | Path,
                              progress_factory=None) -> TrainingInputs:
    """Generate the ``--synthetic`` workload (``args.generator``: ``planted``, the
    default, or ``realistic``), write its feature log under ``feature_log``, and
    return its ``TrainingInputs``."""
    from infra.errors import UserFacingError

    root = Path(feature_log)
    if root.exists() and any(root.iterdir()):
        raise UserFacingError(f"--feature-log {root} is not empty; --synthetic writes a new log")
    try:
        events, truth = _generate(args)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    events = [e for _, _, e in _with_progress(events, progress_factory)
              if type(e) in (EngagementEvent, PostEvent, FollowEvent)]
    feature_log_from_events(events, root)
    return training_inputs(events, truth)


def _generate(args: argparse.Namespace):
    """``(events, truth)`` of the workload ``args`` describe."""
    if getattr(args, "generator", "planted") == "realistic":
        from jobs.realistic import RealisticConfig, RealisticWorkload

        workload = RealisticWorkload(RealisticConfig(
            start_ms=SYNTHETIC_START_MS, seed=args.workload_seed, users=args.users,
            communities=args.communities, days=args.days, avg_following=args.avg_following,
            posts_per_user_day=args.posts_per_day))
        return workload.events(), workload.truth
    from jobs.workload import DAY_MS, Workload, WorkloadConfig

    workload = Workload(WorkloadConfig(
        start_ms=SYNTHETIC_START_MS, seed=args.workload_seed, users=args.users,
        avg_following=args.avg_following, celebrities=0, duration_ms=int(args.days * DAY_MS),
        posts_per_user_day=args.posts_per_day, stories_per_user_day=0.0,
        churn_per_user_day=0.0, graph_lead_ms=0))
    return workload.events(), None


def _with_progress(events: Iterable, progress_factory) -> Iterable:
    if progress_factory is None:
        yield from events
        return
    with progress_factory(desc="workload", unit="ev", unit_scale=True) as bar:
        for n, e in enumerate(events, 1):
            yield e
            if n % 4096 == 0:
                bar.update(4096)
