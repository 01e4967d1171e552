"""Training inputs without a running stack: a generated workload and its feature log.

    engagements, posts = synthetic_training_inputs(args, "out/features")   # feedbeam train --synthetic
    for value in replay_features(events, FeatureParams()): ...

``replay_features`` runs the features pipeline's own logic
(``domain.features``: ``FirstStage``, ``AuthorStage``,
``ViewerStage``) over events in event-time order, wired and timed the way
``pipelines.features`` wires its three keyed stateful stages: each key keeps
one timer, and a timer fires once the watermark reaches it. The watermark
here is perfect (the event time of the next event; the workload emits events
in event-time order), so the values and their ``valid_at_ms`` are those the
streaming job emits for the same events with no late data. Nothing is
computed differently for training: the log is what the pipeline would have
written.
"""
from __future__ import annotations

import argparse
import heapq
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
from schemas.events import EngagementEvent, PostEvent, PostEventKind
from schemas.features import FeatureValue

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


def replay_features(events: Iterable[object], params: FeatureParams = FeatureParams()
                    ) -> Iterator[FeatureValue]:
    """The feature values the features pipeline emits for ``events`` (in event-time order).

    Post DELETED events and other topics are ignored, as the pipeline does.
    At the end, timers up to the last event's time fire (later window ends
    would describe a time after the data).
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

    last = None
    for event in events:
        if type(event) is EngagementEvent:
            item = engagement_item(event)
        elif type(event) is PostEvent and event.kind is PostEventKind.CREATED:
            item = post_item(event)
        else:
            continue
        if last is not None and item.t < last:
            raise ValueError("replay_features needs events in event-time order")
        last = item.t
        yield from fire_until(item.t)
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
    if last is not None:
        yield from fire_until(last)


def synthetic_training_inputs(args: argparse.Namespace, feature_log: str | Path,
                              progress_factory=None):
    """Generate the ``--synthetic`` workload, write its feature log under ``feature_log``,
    and return ``(engagements, posts)`` tables for ``build_training_set``."""
    from infra.errors import UserFacingError
    from jobs.training_set import events_table
    from jobs.workload import DAY_MS, Workload, WorkloadConfig
    from stores.files.feature_log import write_feature_log

    config = WorkloadConfig(
        start_ms=SYNTHETIC_START_MS, seed=args.workload_seed, users=args.users,
        avg_following=args.avg_following, celebrities=0, duration_ms=int(args.days * DAY_MS),
        posts_per_user_day=args.posts_per_day, stories_per_user_day=0.0,
        churn_per_user_day=0.0, graph_lead_ms=0)
    try:
        workload = Workload(config)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    root = Path(feature_log)
    if root.exists() and any(root.iterdir()):
        raise UserFacingError(f"--feature-log {root} is not empty; --synthetic writes a new log")
    root.mkdir(parents=True, exist_ok=True)
    events = [e for _, _, e in _with_progress(workload.events(), progress_factory)
              if type(e) in (EngagementEvent, PostEvent)]
    batch: list[FeatureValue] = []
    for value in replay_features(events):
        batch.append(value)
        if len(batch) >= 500_000:
            write_feature_log(root, batch)
            batch = []
    write_feature_log(root, batch)
    return events_table(events, EngagementEvent), events_table(events, PostEvent)


def _with_progress(events: Iterable, progress_factory) -> Iterable:
    if progress_factory is None:
        yield from events
        return
    with progress_factory(desc="workload", unit="ev", unit_scale=True) as bar:
        for n, e in enumerate(events, 1):
            yield e
            if n % 4096 == 0:
                bar.update(4096)
