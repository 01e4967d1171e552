"""ranking: keep every user's ranked feed fresh, debounced, in Redis and Cassandra.

    python -m pipelines.ranking --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming --model_dir .state/models \\
        [--settle_s 0.5 --debounce_s 5 --max_candidates 200 --top_k 20 --max_per_author 3]

Reads post, engagement and follow events (consumer group ``feedbeam-ranking``)
and, through ``RefreshRankedFeeds``, re-ranks the feed of each user they
concern, at most once per ``--debounce_s``, with the model ``latest`` names in
``--model_dir`` (by recency while there is none). Triggers, debounce, the
follow gate and delivery: ``docs/pipelines/ranking.md``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Timestamp

from domain.fanout import FreshnessHistogram
from domain.ranking import (
    GIVE_UP,
    SETTLE,
    WAIT,
    Debounce,
    FollowWait,
    RankingPolicy,
    edge_versions_wanted,
    edges_not_applied,
    engagement_trigger,
    follow_gate,
    follow_trigger,
    post_triggers,
    requests_from,
)
from pipelines.common import Counters, StoreOptions, module_main
from pipelines.fanout import FanoutOptions
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.sink import ApplyInBatches
from pipelines.io.source import ReadEvents
from pipelines.ranking_pool import RANKERS
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, FollowEvent, PostEvent
from schemas.features import DEFAULT_HALF_LIFE_MS
from schemas.ranking import RECENCY_VERSION, RefreshOutcome, RefreshRequest, Trigger
from stores.config import StoreConfig
from stores.ranker import FeedRanker, RankingConfig

if __name__ == "__main__":
    # Before the definitions below: this __main__ copy must not declare the
    # options a second time (see module_main).
    sys.exit(module_main("pipelines.ranking"))

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.ranking"
DEFAULT_GROUP = "feedbeam-ranking"
#: Time domains of the debounce timers (``--debounce_clock``).
CLOCKS = ("event", "processing")


# --------------------------------------------------------------------------- options


class RankingOptions(PipelineOptions):
    """Options of the ranking pipeline. Kafka settings are ``KafkaReadOptions``', the
    stores ``StoreOptions``', ``--push_threshold`` and ``--inactive_days`` the
    fan-out's (``FanoutOptions``): Beam parses one flat namespace, so a flag
    several pipelines read is declared once."""

    @classmethod
    def _add_argparse_args(cls, parser):
        p, d = RankingPolicy(), Debounce()
        parser.add_argument("--model_dir", default=None,
                            help="model directory of `feedbeam train` (default: "
                                 "<FEEDBEAM_STATE_DIR>/models); its `latest` is used")
        parser.add_argument("--model_poll_s", type=float, default=10.0,
                            help="how often a worker checks `latest` for a new model version")
        parser.add_argument("--settle_s", type=float, default=d.settle_ms / 1000,
                            help="delay from a user's first change to the refresh")
        parser.add_argument("--debounce_s", type=float, default=d.interval_ms / 1000,
                            help="a user's ranked feed is refreshed at most once per this long")
        parser.add_argument("--debounce_clock", choices=CLOCKS, default="event",
                            help="time domain of the debounce timers: event time (watermark; "
                                 "deterministic) or processing time (lower latency live)")
        w = FollowWait()
        parser.add_argument("--follow_wait_s", type=float, default=w.max_wait_ms / 1000,
                            help="a refresh after a follow or unfollow waits up to this long "
                                 "(wall clock) for the fan-out to apply the edge; 0: no wait")
        parser.add_argument("--follow_retry_s", type=float, default=w.retry_ms / 1000,
                            help="first delay before a waiting refresh checks the fan-out's "
                                 "graph again (doubling up to --follow_max_retry_s)")
        parser.add_argument("--follow_max_retry_s", type=float, default=w.max_retry_ms / 1000)
        parser.add_argument("--max_candidates", type=int, default=p.max_candidates,
                            help="candidates ranked per user (newest first)")
        parser.add_argument("--pushed_limit", type=int, default=p.pushed_limit,
                            help="newest home-feed entries read per user")
        parser.add_argument("--celebrity_posts", type=int, default=p.celebrity_posts,
                            help="recent posts pulled per followed celebrity")
        parser.add_argument("--max_age_days", type=float, default=p.max_age_days,
                            help="older candidates are not ranked")
        parser.add_argument("--top_k", type=int, default=p.top_k,
                            help="the diversity cap applies to the top this many positions")
        parser.add_argument("--max_per_author", type=int, default=p.max_per_author,
                            help="posts of one author allowed in the top --top_k")
        parser.add_argument("--no_adjacent", type=_bool, default=p.no_adjacent,
                            help="no two adjacent posts of one author (true/false)")
        parser.add_argument("--feature_half_life_days", type=float,
                            default=DEFAULT_HALF_LIFE_MS / 86_400_000,
                            help="affinity half-life of the features pipeline")
        parser.add_argument("--refresh_batch", type=int, default=256,
                            help="users refreshed (scored) together within a bundle")
        parser.add_argument("--latency_log_s", type=float, default=60.0,
                            help="period of the log line with refresh counts, batch times and "
                                 "change-to-ranked-feed p50/p99")
        parser.add_argument("--score_threads", type=int, default=1,
                            help="XGBoost threads per scoring call (0 = all cores); 1 leaves "
                                 "the cores to the other bundles and the store I/O")
        parser.add_argument("--io_threads", type=int, default=8,
                            help="threads per worker overlapping a batch's per-user store "
                                 "round trips (feature hydrate, ranked-feed write)")

    def policy(self) -> RankingPolicy:
        fanout = self.view_as(FanoutOptions)
        return RankingPolicy(
            max_candidates=self.max_candidates, pushed_limit=self.pushed_limit,
            celebrity_posts=self.celebrity_posts, max_age_days=self.max_age_days,
            push_threshold=fanout.push_threshold, inactive_days=fanout.inactive_days,
            top_k=self.top_k, max_per_author=self.max_per_author, no_adjacent=self.no_adjacent)

    def debounce(self) -> Debounce:
        return Debounce(settle_ms=int(self.settle_s * 1000), interval_ms=int(self.debounce_s * 1000))

    def follow_wait(self) -> FollowWait | None:
        if self.follow_wait_s <= 0:
            return None
        retry_ms = max(1, int(self.follow_retry_s * 1000))
        return FollowWait(retry_ms=retry_ms,
                          max_retry_ms=max(retry_ms, int(self.follow_max_retry_s * 1000)),
                          max_wait_ms=int(self.follow_wait_s * 1000))

    def config(self) -> RankingConfig:
        if self.model_dir is None:
            raise ValueError("--model_dir is not set (run() defaults it from FEEDBEAM_STATE_DIR)")
        return RankingConfig(
            self.view_as(StoreOptions).config(), model_dir=self.model_dir,
            model_poll_s=self.model_poll_s,
            half_life_ms=int(self.feature_half_life_days * 86_400_000),
            score_threads=self.score_threads, io_threads=self.io_threads)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# --------------------------------------------------------------------------- triggers


class _TriggersFn(beam.DoFn):
    """Event -> ``(user_id, Trigger)`` for every user whose ranked feed it makes stale."""

    def __init__(self, stores: StoreConfig, policy: RankingPolicy):
        self._store_config = stores
        self._policy = policy

    def setup(self):
        from stores.redis.feeds import RedisFeedStore

        c = self._store_config
        self._feeds = RedisFeedStore.from_url(c.redis_url, key_prefix=c.redis_key_prefix)
        self._counters = Counters(NAMESPACE)

    def teardown(self):
        feeds = getattr(self, "_feeds", None)
        if feeds is not None:
            self._feeds = None
            feeds.close()

    def process(self, event):
        if isinstance(event, PostEvent):
            followers = self._feeds.followers(event.author_id)
            triggers = post_triggers(event, followers, self._feeds.last_reads(followers),
                                     self._policy.inactive_ms)
        elif isinstance(event, FollowEvent):
            triggers = [follow_trigger(event)]
        elif isinstance(event, EngagementEvent):
            trigger = engagement_trigger(event)
            triggers = [] if trigger is None else [trigger]
        else:
            triggers = []
        if not triggers:
            self._counters.inc("events_without_trigger")
        for t in triggers:
            self._counters.inc(f"triggers_{t.reason}")
            yield t.user_id, t


# --------------------------------------------------------------------------- debounce


_TRIGGER_CODER = coders.TupleCoder([
    coders.VarIntCoder(), coders.VarIntCoder(), coders.StrUtf8Coder(), coders.VarIntCoder(),
    coders.VarIntCoder(), coders.VarIntCoder(), coders.StrUtf8Coder()])


def debounce_fn(debounce: Debounce, clock: str = "event", follow_wait: FollowWait | None = None,
                stores: StoreConfig | None = None) -> beam.DoFn:
    """The per-user debounce step: collects triggers, emits one ``RefreshRequest`` per
    refresh (``Debounce`` decides when).

    ``follow_wait`` (needs ``stores``): a due refresh whose triggers include
    follows or unfollows first checks that the fan-out's graph in Redis holds
    those edges (``edges_not_applied``); if not, it is put off and checked
    again every ``retry_ms`` (``follow_gate``), its triggers kept, up to
    ``max_wait_ms`` of wall time. Without it, a backlog the ranking reads
    faster than the fan-out ranks users before their follows' posts reach
    their feeds, and nothing refreshes them again until their next change.

    ``clock="event"``: timers in event time, set from the elements' timestamps
    and fired by the watermark (deterministic under replays and in tests; the
    watermark's lag behind the wall clock adds to the latency).
    ``clock="processing"``: timers in processing time, set from the wall clock
    when a trigger arrives (lower latency live; a replay coalesces by how fast
    it runs, not by event time).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, not {clock!r}")
    if follow_wait is not None and stores is None:
        raise ValueError("follow_wait needs the stores (the fan-out's graph is read from Redis)")
    domain = TimeDomain.WATERMARK if clock == "event" else TimeDomain.REAL_TIME

    class DebounceFn(beam.DoFn):
        PENDING = userstate.BagStateSpec("pending", _TRIGGER_CODER)
        TIMER_AT = userstate.ReadModifyWriteStateSpec("timer_at", coders.VarIntCoder())
        WAITING = userstate.ReadModifyWriteStateSpec("follow_wait_since", coders.VarIntCoder())
        WAITS = userstate.ReadModifyWriteStateSpec("follow_waits", coders.VarIntCoder())
        REFRESH = userstate.TimerSpec("refresh", domain)

        def setup(self):
            self._graph = None
            if follow_wait is not None:
                from stores.redis.feeds import RedisFeedStore

                self._graph = RedisFeedStore.from_url(stores.redis_url,
                                                      key_prefix=stores.redis_key_prefix)
                self._waits = Metrics.counter(NAMESPACE, "follow_waits")
                self._give_ups = Metrics.counter(NAMESPACE, "follow_wait_timeouts")

        def teardown(self):
            if getattr(self, "_graph", None) is not None:
                self._graph.close()
                self._graph = None

        def _gate(self, user_id: int, triggers: list[Trigger], waiting, waits) -> int | None:
            """None: refresh now; else the delay (ms) before checking again."""
            since = waiting.read()
            wanted = edge_versions_wanted(triggers)
            if not wanted and since is None:
                return None
            unapplied = edges_not_applied(
                wanted, self._graph.following_edge_versions(user_id, list(wanted)))
            decision = follow_gate(follow_wait, unapplied, since, int(time.time() * 1000))
            if decision == WAIT:
                self._waits.inc()
                n = (waits.read() or 0) + 1
                waits.write(n)
                if since is None:
                    waiting.write(int(time.time() * 1000))
                return follow_wait.retry_delay(n)
            waiting.clear()
            waits.clear()
            if decision == SETTLE:
                return follow_wait.retry_ms
            if decision == GIVE_UP:
                self._give_ups.inc()
                log.warning("ranking: user %d refreshed without the fan-out's edges to %s after "
                            "waiting %.0f s", user_id, unapplied, follow_wait.max_wait_ms / 1000)
            return None

        def process(self, element, ts=beam.DoFn.TimestampParam,
                    pending=beam.DoFn.StateParam(PENDING),
                    timer_at=beam.DoFn.StateParam(TIMER_AT),
                    refresh=beam.DoFn.TimerParam(REFRESH)):
            _, trigger = element
            pending.add(tuple(trigger))
            now_ms = ts.micros // 1000 if clock == "event" else int(time.time() * 1000)
            at = debounce.on_change(timer_at.read(), now_ms)
            if at is not None:
                refresh.set(Timestamp(micros=at * 1000))
                timer_at.write(at)

        @userstate.on_timer(REFRESH)
        def on_refresh(self, key=beam.DoFn.KeyParam, pending=beam.DoFn.StateParam(PENDING),
                       timer_at=beam.DoFn.StateParam(TIMER_AT),
                       waiting=beam.DoFn.StateParam(WAITING),
                       waits=beam.DoFn.StateParam(WAITS),
                       refresh=beam.DoFn.TimerParam(REFRESH)):
            triggers = [Trigger(*t) for t in pending.read()]
            delay = (self._gate(key, triggers, waiting, waits)
                     if triggers and self._graph is not None else None)
            if delay is not None:
                retry_at = timer_at.read() + delay  # the triggers stay pending
                refresh.set(Timestamp(micros=retry_at * 1000))
                timer_at.write(retry_at)
                return
            # The time the timer was set for: the same in both domains.
            now, next_at = debounce.on_timer(timer_at.read(), bool(triggers))
            pending.clear()
            if next_at is None:
                timer_at.clear()
            else:
                refresh.set(Timestamp(micros=next_at * 1000))
                timer_at.write(next_at)
            if now:
                yield requests_from(key, triggers)

    return DebounceFn()



# --------------------------------------------------------------------------- refresh


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """The refresh step's applier configuration (``pipelines.io.sink``): what it pickles.

    ``open()`` holds the worker process's ``FeedRanker`` for ``ranking`` and
    ``policy`` (``pipelines.ranking_pool``: built by the first holder, shared
    by every bundle's instance, closed by the last ``close()``).
    """

    ranking: RankingConfig
    policy: RankingPolicy
    latency_log_s: float = 60.0

    def open(self) -> "FeedRefresher":
        return FeedRefresher(self, RANKERS.hold(self.ranking, self.policy))


class FeedRefresher:
    """Refreshes a batch of requests with the shared ranker and records what it did:
    counters ``refreshes``, ``refreshes_model``, ``refreshes_recency``,
    distributions ``refresh_latency_ms`` (event time of the change to the write)
    and ``candidates``, gauges ``model_swaps`` and ``model_errors`` (the worker's
    totals), and every ``latency_log_s`` a log line of counts, batch times and
    change-to-ranked-feed latency."""

    def __init__(self, config: RefreshConfig, ranker: FeedRanker):
        self._config = config
        self._ranker = ranker
        self._counters = Counters(NAMESPACE)
        self._latency = Metrics.distribution(NAMESPACE, "refresh_latency_ms")
        self._candidates = Metrics.distribution(NAMESPACE, "candidates")
        self._swaps = Metrics.gauge(NAMESPACE, "model_swaps")
        self._errors = Metrics.gauge(NAMESPACE, "model_errors")
        now = time.monotonic()
        self._latency_ms = FreshnessHistogram(config.latency_log_s, now_s=now)
        self._batch_ms = FreshnessHistogram(config.latency_log_s, now_s=now)

    def apply(self, requests: Sequence[RefreshRequest]) -> list[RefreshOutcome | None]:
        """One output per request, in order: the user's outcome at the user's last request
        in the batch, None at the others (``FeedRanker`` merges a user's requests)."""
        started = time.monotonic()
        outcomes = {o.user_id: o for o in self._ranker.refresh(requests)}
        self._batch_ms.add((time.monotonic() - started) * 1000)
        for o in outcomes.values():
            self._record(o)
        self._swaps.set(self._ranker.models.swaps)
        self._errors.set(self._ranker.model_errors)
        self._maybe_log()
        last = {r.user_id: i for i, r in enumerate(requests)}
        return [outcomes[r.user_id] if last[r.user_id] == i else None
                for i, r in enumerate(requests)]

    def close(self) -> None:
        if self._ranker is not None:
            self._ranker = None
            RANKERS.release(self._config.ranking, self._config.policy)

    def _record(self, o: RefreshOutcome) -> None:
        self._counters.inc("refreshes")
        self._counters.inc("refreshes_recency" if o.model_version == RECENCY_VERSION
                           else "refreshes_model")
        self._candidates.update(o.candidates)
        latency = max(0, o.generated_at_ms - o.changed_at_ms)
        self._latency.update(latency)
        self._latency_ms.add(latency)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if not self._latency_ms.due(now):
            return
        latency, batches = self._latency_ms.flush(now), self._batch_ms.flush(now)
        if latency and batches:
            log.info("ranking over the last %.0fs: %d refreshes in %d batches (batch p50 %.0f ms, "
                     "p99 %.0f ms); change to ranked feed p50 %.0f ms, p99 %.0f ms",
                     self._config.latency_log_s, latency[0], batches[0], batches[1], batches[2],
                     latency[1], latency[2])


class RefreshRankedFeeds(beam.PTransform):
    """Keep the ranked feeds of the users that events concern fresh
    (``docs/pipelines/ranking.md``).

    Args:
      config: stores and model directory (``RankingConfig``).
      policy: candidates and diversity (``RankingPolicy``).
      debounce: settle delay and minimum interval per user (``Debounce``).
      max_batch: users scored together within a bundle.
      clock: time domain of the debounce timers, ``"event"`` or ``"processing"``
        (``debounce_fn``).
      latency_log_s: period of the refresh log line (counts, batch times, latency).
      follow_wait: how a refresh after a follow waits for the fan-out to apply
        it (``FollowWait``; None: it does not wait).

    Takes a ``PCollection`` of events (``PostEvent``, ``FollowEvent``,
    ``EngagementEvent``; others are counted and ignored), timestamped by event
    time. Returns a ``PCollection[RefreshOutcome]``, one per refresh written.
    """

    def __init__(self, config: RankingConfig, policy: RankingPolicy = RankingPolicy(),
                 debounce: Debounce = Debounce(), max_batch: int = 256, clock: str = "event",
                 latency_log_s: float = 60.0, follow_wait: FollowWait | None = FollowWait()):
        super().__init__()
        self._config = config
        self._policy = policy
        self._debounce = debounce
        self._max_batch = max_batch
        self._clock = clock
        self._latency_log_s = latency_log_s
        self._follow_wait = follow_wait

    def expand(self, events):
        return (events
                | "Triggers" >> beam.ParDo(_TriggersFn(self._config.stores, self._policy))
                .with_output_types(beam.typehints.Tuple[int, Trigger])
                | "Debounce" >> beam.ParDo(debounce_fn(self._debounce, self._clock,
                                                       self._follow_wait, self._config.stores))
                .with_output_types(RefreshRequest)
                | "Refresh" >> ApplyInBatches(
                    RefreshConfig(self._config, self._policy, self._latency_log_s),
                    namespace=NAMESPACE, max_batch=self._max_batch,
                    output_type=RefreshOutcome))


def build(pipeline: beam.Pipeline, options: PipelineOptions):
    """Wire the ranking job into ``pipeline``; returns the outcomes PCollection."""
    kafka = options.view_as(KafkaReadOptions)
    ranking = options.view_as(RankingOptions)
    debounce = ranking.debounce()
    # Triggers live in runner state for up to max(settle, interval): re-read
    # that much (plus a margin) after a restart.
    rewind_s = max(debounce.settle_ms, debounce.interval_ms) / 1000 + 5.0
    config = kafka.source_config(default_group=DEFAULT_GROUP, default_rewind_s=rewind_s)
    prefix = kafka.topic_prefix
    topics = [prefix + t.TOPIC for t in (PostEvent, EngagementEvent, FollowEvent)]
    return (pipeline
            | "ReadEvents" >> ReadEvents(config, topics, topic_prefix=prefix)
            | "RefreshRankedFeeds" >> RefreshRankedFeeds(
                ranking.config(), ranking.policy(), debounce, ranking.refresh_batch,
                ranking.debounce_clock, ranking.latency_log_s, ranking.follow_wait()))


def run(argv=None):
    """Parse options, build the streaming pipeline and run it until it is cancelled."""
    options = pipeline_options(argv)
    ranking = options.view_as(RankingOptions)
    if ranking.model_dir is None:
        from infra.settings import StackSettings

        ranking.model_dir = str(StackSettings.from_env().state_dir / "models")
    options.view_as(StandardOptions).streaming = True
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)
