"""ranking: keep every user's ranked feed fresh, debounced, in Redis and Cassandra.

    python -m pipelines.ranking --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming --model_dir .state/models \\
        [--settle_s 0.25 --debounce_s 2 --max_candidates 200 --top_k 20 --max_per_author 3]

Reads post, engagement and follow events (consumer group ``feedbeam-ranking``)
and, through ``RefreshRankedFeeds``, queues a refresh of each user they concern
in Redis, then re-ranks the queued users in batches with the model ``latest``
names in ``--model_dir`` (by recency while there is none). Triggers, the
queue, the follow gate and delivery: ``docs/pipelines/ranking.md``.
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
from domain.ranking import Debounce, FollowWait, RankingPolicy, ViralPolicy
from pipelines.common import Counters, StoreOptions, module_main
from pipelines.fanout import FanoutOptions
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.sink import ApplyInBatches
from pipelines.io.source import ReadEventBatches
from pipelines.ranking_pool import RANKERS
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, FollowEvent, PostEvent
from schemas.features import DEFAULT_HALF_LIFE_MS
from schemas.keys import KeyLayout
from schemas.ranking import RECENCY_VERSION, ClaimedRefreshes, RefreshOutcome
from schemas.records import decode_batch
from schemas.validation import EventLimits
from stores.config import StoreConfig
from stores.ranker import ClaimRefresher, FeedRanker, QueueConfig, RankingConfig, TriggerWriter
from stores.restore import RedisHealer, RestoreSettings, open_healer
from stores.retry import RetryPolicy

if __name__ == "__main__":
    # Before the definitions below: this __main__ copy must not declare the
    # options a second time (see module_main).
    sys.exit(module_main("pipelines.ranking"))

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.ranking"
DEFAULT_GROUP = "feedbeam-ranking"


# --------------------------------------------------------------------------- options


class RankingOptions(PipelineOptions):
    """Options of the ranking pipeline. Kafka settings are ``KafkaReadOptions``', the
    stores ``StoreOptions``', ``--push_threshold`` and ``--inactive_days`` the
    fan-out's (``FanoutOptions``): Beam parses one flat namespace, so a flag
    several pipelines read is declared once."""

    @classmethod
    def _add_argparse_args(cls, parser):
        p, d, v, q = RankingPolicy(), Debounce(), ViralPolicy(), QueueConfig()
        parser.add_argument("--model_dir", default=None,
                            help="model directory of `feedbeam train` (default: "
                                 "<FEEDBEAM_STATE_DIR>/models); its `latest` is used")
        parser.add_argument("--model_poll_s", type=float, default=10.0,
                            help="how often a worker checks `latest` for a new model version")
        parser.add_argument("--settle_s", type=float, default=d.settle_ms / 1000,
                            help="delay from a user's first change to the refresh")
        parser.add_argument("--debounce_s", type=float, default=d.interval_ms / 1000,
                            help="a user's ranked feed is refreshed at most once per this long "
                                 "on average (a token bucket refilled at this period)")
        parser.add_argument("--debounce_burst", type=int, default=d.burst,
                            help="refreshes a user may have in a row before --debounce_s "
                                 "spaces them (1: a plain cool-down after each refresh)")
        w = FollowWait()
        parser.add_argument("--follow_wait_s", type=float, default=w.max_wait_ms / 1000,
                            help="a refresh after a follow or unfollow waits up to this long "
                                 "(wall clock) for the fan-out to apply the edge; 0: no wait")
        parser.add_argument("--follow_retry_s", type=float, default=w.retry_ms / 1000,
                            help="first delay before a waiting refresh checks the fan-out's "
                                 "graph again (doubling up to --follow_max_retry_s)")
        parser.add_argument("--follow_max_retry_s", type=float, default=w.max_retry_ms / 1000)
        parser.add_argument("--carry_unstored_s", type=float, default=p.carry_unstored_ms / 1000,
                            help="a new post ranked before the fan-out stored it stays a "
                                 "candidate of that user's next refreshes until this long "
                                 "after its creation; 0: off")
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
        parser.add_argument("--post_refresh_cap", type=int, default=p.post_refresh_cap,
                            help="users a post (or its jump in engagement) refreshes eagerly, "
                                 "at most; the rest see it at read time and in their next "
                                 "refresh")
        parser.add_argument("--viral_min_engagements", type=int, default=v.min_engagements,
                            help="engagements in a post's last hour that make it viral (its "
                                 "audience is re-ranked); 0: off")
        parser.add_argument("--viral_factor", type=float, default=v.factor,
                            help="the count growth by which a viral post re-ranks again")
        parser.add_argument("--viral_user_interval_s", type=float,
                            default=v.user_interval_ms / 1000,
                            help="a user is re-ranked for a viral post at most once per this long")
        parser.add_argument("--feature_cache_s", type=float, default=10.0,
                            help="parsed post and author features are reused this long (a "
                                 "viral post's are read again at once); 0: read every time")
        parser.add_argument("--feature_half_life_days", type=float,
                            default=DEFAULT_HALF_LIFE_MS / 86_400_000,
                            help="affinity half-life of the features pipeline")
        parser.add_argument("--refresh_batch", type=int, default=256,
                            help="users refreshed (scored) together")
        parser.add_argument("--refresh_shards", type=int, default=q.shards,
                            help="shards of the pending-refresh queue (drained in parallel); "
                                 "keep it across restarts")
        parser.add_argument("--refresh_lease_s", type=float, default=q.lease_ms / 1000,
                            help="a claimed refresh not finished within this long (its worker "
                                 "died) is handed out again")
        parser.add_argument("--refresh_gather_s", type=float, default=0.05,
                            help="least time between two claims of one queue shard: due users "
                                 "gather into batches")
        parser.add_argument("--trigger_batch", type=int, default=16,
                            help="event batches (Kafka polls) whose triggers are queued together")
        parser.add_argument("--latency_log_s", type=float, default=60.0,
                            help="period of the log line with refresh counts, batch times and "
                                 "change-to-ranked-feed p50/p99")
        parser.add_argument("--loss_replay_s", type=float, default=1800.0,
                            help="after Redis lost its data (and its pending refreshes with it) "
                                 "while the job ran, the triggers of this much recent input are "
                                 "queued again (cover --follow_wait_s); 0: off")
        parser.add_argument("--loss_replay_max_records", type=int, default=500_000,
                            help="records that replay reads at most (each partition's newest)")
        parser.add_argument("--score_threads", type=int, default=1,
                            help="XGBoost threads per scoring call (0 = all cores); 1 leaves "
                                 "the cores to the other bundles and the store I/O")

    def policy(self) -> RankingPolicy:
        fanout = self.view_as(FanoutOptions)
        return RankingPolicy(
            max_candidates=self.max_candidates, pushed_limit=self.pushed_limit,
            celebrity_posts=self.celebrity_posts, max_age_days=self.max_age_days,
            push_threshold=fanout.push_threshold, inactive_days=fanout.inactive_days,
            top_k=self.top_k, max_per_author=self.max_per_author, no_adjacent=self.no_adjacent,
            post_refresh_cap=self.post_refresh_cap,
            carry_unstored_ms=int(self.carry_unstored_s * 1000))

    def viral(self) -> ViralPolicy:
        return ViralPolicy(self.viral_min_engagements, self.viral_factor,
                           int(self.viral_user_interval_s * 1000))

    def queue(self) -> QueueConfig:
        return QueueConfig(self.refresh_shards,
                           Debounce(int(self.settle_s * 1000), int(self.debounce_s * 1000),
                                    self.debounce_burst),
                           int(self.refresh_lease_s * 1000))

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
        half_life_ms = int(self.feature_half_life_days * 86_400_000)
        fanout = self.view_as(FanoutOptions)
        # A restore this job runs must agree with the fan-out's caps and the features' decay.
        restore = RestoreSettings(feed_cap=fanout.feed_cap, timeline_cap=fanout.timeline_cap,
                                  half_life_ms=half_life_ms)
        return RankingConfig(
            self.view_as(StoreOptions).config(), model_dir=self.model_dir,
            model_poll_s=self.model_poll_s, half_life_ms=half_life_ms,
            score_threads=self.score_threads, feature_cache_s=self.feature_cache_s,
            restore=restore)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _now_ms() -> int:
    return int(time.time() * 1000)


class _HealerCounts:
    """Counts what a ``RedisHealer`` did within the block: ``redis_restores`` and
    ``batches_redone_after_redis_loss`` (nothing without a healer)."""

    def __init__(self, healer: RedisHealer | None, counters: Counters):
        self._healer, self._counters = healer, counters

    def __enter__(self):
        if self._healer is not None:
            self._before = (self._healer.restores, self._healer.reruns)

    def __exit__(self, *exc):
        if self._healer is not None:
            restores, reruns = self._before
            self._counters.inc("redis_restores", self._healer.restores - restores)
            self._counters.inc("batches_redone_after_redis_loss", self._healer.reruns - reruns)


# --------------------------------------------------------------------------- triggers


@dataclasses.dataclass(frozen=True)
class LossReplay:
    """What the trigger step reads again after Redis lost its pending refreshes: the
    job's topics from ``window_ms`` before the loss was seen, ``max_records`` at most,
    with the source's consumer settings and event checks (picklable)."""

    consumer_config: dict
    topics: tuple[str, ...]
    topic_prefix: str = ""
    window_ms: int = 1_800_000
    max_records: int = 500_000
    limits: EventLimits = EventLimits()

    def batches(self, now_ms: int):
        """The window's events, an ``EventBatch`` per record batch (records that fail
        decoding or the checks were dead-lettered by the source: skipped here)."""
        from schemas.codec import WireCodec
        from stores.kafka.window import read_window

        codec = WireCodec()
        config = {k: v for k, v in self.consumer_config.items()
                  if k not in ("group.id", "enable.auto.commit", "auto.offset.reset")}
        for records in read_window(config, self.topics, now_ms - self.window_ms,
                                   self.max_records):
            events, _ = decode_batch(codec, records, self.topic_prefix, self.limits, now_ms)
            yield events


@dataclasses.dataclass(frozen=True)
class TriggerConfig:
    """The trigger step's applier configuration (``pipelines.io.sink``): what it pickles.
    ``restore``: check Redis' generation marker per batch and restore a Redis that lost
    its data with these settings (None: no check); ``loss_replay``: what is read again
    to queue the lost pending refreshes once such a loss is seen (None: nothing)."""

    stores: StoreConfig
    policy: RankingPolicy
    viral: ViralPolicy
    queue: QueueConfig
    restore: RestoreSettings | None = None
    loss_replay: LossReplay | None = None

    def open(self) -> "TriggerApplier":
        return TriggerApplier(self)


class TriggerApplier:
    """Queues the triggers of a batch of ``EventBatch``es (``TriggerWriter``) and answers
    the last one with the ``(shard, earliest due ms)`` of the queue shards it wrote.
    Counters ``triggers_<reason>``, ``events_without_trigger``, ``viral_posts``,
    ``redis_restores``, ``batches_redone_after_redis_loss``."""

    def __init__(self, config: TriggerConfig):
        from stores.redis.candidates import AudienceReader
        from stores.redis.features import OnlineFeatureStore
        from stores.redis.feeds import RedisFeedStore

        c = config.stores
        self._feeds = RedisFeedStore.from_url(c.redis_url, key_prefix=c.redis_key_prefix)
        healer = (None if config.restore is None
                  else open_healer(c, config.restore, self._feeds.client))
        self._writer = TriggerWriter(
            AudienceReader(self._feeds), OnlineFeatureStore(self._feeds.client, self._feeds.keys),
            config.queue.open(self._feeds.client, self._feeds.keys), config.policy, config.viral,
            healer=healer)
        self._counters = Counters(NAMESPACE)
        self._replay = config.loss_replay
        self._losses_seen: int | None = None  # restores + reruns of the healer so far

    def apply(self, batches: Sequence) -> list:
        with _HealerCounts(self._writer.healer, self._counters):
            result = self._writer.apply([e for b in batches for e in b.events])
        self._after_loss()
        for reason, n in result.reasons.items():
            self._counters.inc(f"triggers_{reason}", n)
        self._counters.inc("events_without_trigger", result.quiet)
        self._counters.inc("viral_posts", result.viral_posts)
        ticks = tuple((shard, due) for shard, due in result.due.items() if due is not None)
        return [None] * (len(batches) - 1) + [ticks]

    def _after_loss(self) -> None:
        """Queue again the triggers of the recent input once a Redis loss was seen while
        the job ran: the pending refreshes queued before it were lost with Redis."""
        healer = self._writer.healer
        if healer is None or self._replay is None:
            return
        losses = healer.restores + healer.reruns
        seen, self._losses_seen = self._losses_seen, losses
        if seen is None or losses == seen:
            return  # the first batch (a job that starts is no loss) or no loss since
        started, n = time.monotonic(), 0
        for events in self._replay.batches(_now_ms()):
            if len(events):
                self._writer.apply(list(events.events))
                n += len(events)
        self._losses_seen = healer.restores + healer.reruns
        self._counters.inc("events_replayed_after_redis_loss", n)
        log.warning("ranking: Redis lost its pending refreshes; the triggers of %d events of "
                    "the last %.0fs were queued again in %.1fs", n,
                    self._replay.window_ms / 1000, time.monotonic() - started)

    def close(self) -> None:
        self._feeds.close()


# --------------------------------------------------------------------------- drain


class _DrainFn(beam.DoFn):
    """Keyed by queue shard: claims the shard's due users when they are due.

    Elements are ``(shard, due ms)`` ticks (from the trigger step, and one per
    shard at start so that a restarted job drains what the queue holds). A
    processing-time timer fires at the earliest due it knows of, no sooner
    than ``gather_ms`` after the last claim; it claims up to ``max_users`` at
    a time (a few claims while full) and re-arms at the queue's next due or
    lease end, and while a claim is out no later than ``recheck_ms``: finishing
    it makes users due that the queue did not know of when this claim ran
    (put off by the follow gate), and nothing else might
    wake the shard before the lease ends (30 s). The queue, not this state, is
    the record: losing the timer loses nothing but the wake-up, which the next
    tick or the start gives back.
    """

    ARMED = userstate.ReadModifyWriteStateSpec("armed_at", coders.VarIntCoder())
    DRAIN = userstate.TimerSpec("drain", TimeDomain.REAL_TIME)

    def __init__(self, stores: StoreConfig, queue: QueueConfig, max_users: int, gather_ms: int,
                 max_claims: int = 4, retry: RetryPolicy = RetryPolicy()):
        self._stores = stores
        self._queue_config = queue
        self._max_users = max_users
        self._gather_ms = gather_ms
        self._recheck_ms = max(gather_ms, queue.debounce.settle_ms)
        self._max_claims = max_claims
        self._retry = retry

    def setup(self):
        from stores.redis.client import new_client

        self._client = new_client(self._stores.redis_url)
        self._queue = self._queue_config.open(self._client, KeyLayout(self._stores.redis_key_prefix))
        self._claims = Metrics.counter(NAMESPACE, "claims")

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            self._client = None
            client.close()

    def process(self, element, armed=beam.DoFn.StateParam(ARMED),
                drain=beam.DoFn.TimerParam(DRAIN)):
        _, due = element
        at = max(int(due), _now_ms())
        held = armed.read()
        if held is None or at < held:
            drain.set(Timestamp(micros=at * 1000))
            armed.write(at)

    @userstate.on_timer(DRAIN)
    def on_drain(self, shard=beam.DoFn.KeyParam, armed=beam.DoFn.StateParam(ARMED),
                 drain=beam.DoFn.TimerParam(DRAIN)):
        armed.clear()
        next_at = None
        for _ in range(self._max_claims):
            claim = self._retry.call(
                lambda: self._queue.claim(shard, _now_ms(), self._max_users),
                what=f"ranking: claim of queue shard {shard}")
            next_at = claim.next_at_ms
            if claim.refreshes.users:
                self._claims.inc()
                yield claim.refreshes
            if len(claim.refreshes.users) < self._max_users:
                break
        if claim.leased:
            recheck = _now_ms() + self._recheck_ms
            next_at = recheck if next_at is None else min(next_at, recheck)
        if next_at is not None:
            at = max(next_at, _now_ms() + self._gather_ms)
            drain.set(Timestamp(micros=at * 1000))
            armed.write(at)


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
    queue: QueueConfig = QueueConfig()
    follow_wait: FollowWait | None = FollowWait()
    latency_log_s: float = 60.0

    def open(self) -> "FeedRefresher":
        return FeedRefresher(self, RANKERS.hold(self.ranking, self.policy))


class FeedRefresher:
    """Refreshes claimed users with the shared ranker (``ClaimRefresher``), one output per
    claim (its outcomes), and records what it did: counters ``refreshes``,
    ``refreshes_model``, ``refreshes_recency``, ``follow_waits``,
    ``follow_wait_timeouts``; distributions ``refresh_latency_ms`` (event time of
    the change to the write), ``refresh_wait_ms`` (its part before the claim) and
    ``candidates``; gauges ``model_swaps``,
    ``model_errors`` and ``posts_carried`` (the worker's totals); and every
    ``latency_log_s`` a log line of counts, batch times and change-to-ranked-feed
    latency."""

    def __init__(self, config: RefreshConfig, ranker: FeedRanker):
        self._config = config
        self._ranker = ranker
        feeds = ranker.candidates.feeds
        self._claims = ClaimRefresher(ranker, config.queue.open(feeds.client, feeds.keys),
                                      config.follow_wait)
        self._counters = Counters(NAMESPACE)
        self._latency = Metrics.distribution(NAMESPACE, "refresh_latency_ms")
        self._waits = Metrics.distribution(NAMESPACE, "refresh_wait_ms")
        self._candidates = Metrics.distribution(NAMESPACE, "candidates")
        self._swaps = Metrics.gauge(NAMESPACE, "model_swaps")
        self._errors = Metrics.gauge(NAMESPACE, "model_errors")
        self._carried = Metrics.gauge(NAMESPACE, "posts_carried")
        now = time.monotonic()
        self._latency_ms = FreshnessHistogram(config.latency_log_s, now_s=now)
        self._batch_ms = FreshnessHistogram(config.latency_log_s, now_s=now)
        self._wait_ms = FreshnessHistogram(config.latency_log_s, now_s=now)

    def apply(self, claims: Sequence[ClaimedRefreshes]) -> list[tuple[RefreshOutcome, ...]]:
        out = []
        for claim in claims:
            started = time.monotonic()
            # The ranker is shared by the worker's threads: counts may include theirs.
            with _HealerCounts(self._ranker.healer, self._counters):
                result = self._claims.apply([claim])
            self._batch_ms.add((time.monotonic() - started) * 1000)
            self._counters.inc("follow_waits", result.waits)
            self._counters.inc("follow_wait_timeouts", result.give_ups)
            for o in result.outcomes:
                self._record(o, claim.claimed_at_ms)
            out.append(tuple(result.outcomes))
        if self._ranker.models is not None:
            self._swaps.set(self._ranker.models.swaps)
        self._errors.set(self._ranker.model_errors)
        self._carried.set(self._ranker.carried)
        self._maybe_log()
        return out

    def close(self) -> None:
        if self._ranker is not None:
            self._ranker = None
            RANKERS.release(self._config.ranking, self._config.policy)

    def _record(self, o: RefreshOutcome, claimed_at_ms: int) -> None:
        self._counters.inc("refreshes")
        self._counters.inc("refreshes_recency" if o.model_version == RECENCY_VERSION
                           else "refreshes_model")
        self._candidates.update(o.candidates)
        latency = max(0, o.generated_at_ms - o.changed_at_ms)
        self._latency.update(latency)
        self._latency_ms.add(latency)
        # The part before the claim: reading, queueing, --settle_s, the debounce's
        # bucket, the drain's wake-up; the rest is the refresh itself.
        waited = min(latency, max(0, claimed_at_ms - o.changed_at_ms))
        self._waits.update(waited)
        self._wait_ms.add(waited)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if not self._latency_ms.due(now):
            return
        latency, batches = self._latency_ms.flush(now), self._batch_ms.flush(now)
        waited = self._wait_ms.flush(now)
        if latency and batches and waited:
            log.info("ranking over the last %.0fs: %d refreshes in %d batches (batch p50 %.0f ms, "
                     "p99 %.0f ms); change to ranked feed p50 %.0f ms, p99 %.0f ms, of which "
                     "before the claim p50 %.0f ms, p99 %.0f ms",
                     self._config.latency_log_s, latency[0], batches[0], batches[1], batches[2],
                     latency[1], latency[2], waited[1], waited[2])


class RefreshRankedFeeds(beam.PTransform):
    """Keep the ranked feeds of the users that events concern fresh
    (``docs/pipelines/ranking.md``).

    Args:
      config: stores and model directory (``RankingConfig``).
      policy: candidates, diversity, eager audience of a post (``RankingPolicy``).
      queue: shards, debounce and leases of the pending-refresh queue (``QueueConfig``).
      viral: when a post's jump in engagement re-ranks its audience (``ViralPolicy``).
      follow_wait: how a refresh after a follow waits for the fan-out to apply
        it (``FollowWait``; None: it does not wait).
      max_batch: users refreshed together (one claim).
      gather_s: least time between two claims of one queue shard.
      trigger_batch: event batches whose triggers are queued together.
      latency_log_s: period of the refresh log line (counts, batch times, latency).
      loss_replay: the input read again to queue the pending refreshes a Redis loss
        took (``LossReplay``; None: not read again).

    Takes a ``PCollection[EventBatch]`` of post, engagement and follow events
    (other events are counted and ignored). Returns a
    ``PCollection[RefreshOutcome]``, one per feed written.
    """

    def __init__(self, config: RankingConfig, policy: RankingPolicy = RankingPolicy(),
                 queue: QueueConfig = QueueConfig(), viral: ViralPolicy = ViralPolicy(),
                 follow_wait: FollowWait | None = FollowWait(), max_batch: int = 256,
                 gather_s: float = 0.05, trigger_batch: int = 16, latency_log_s: float = 60.0,
                 loss_replay: LossReplay | None = None):
        super().__init__()
        self._loss_replay = loss_replay
        self._config = config
        self._policy = policy
        self._queue = queue
        self._viral = viral
        self._follow_wait = follow_wait
        self._max_batch = max_batch
        self._gather_ms = int(gather_s * 1000)
        self._trigger_batch = trigger_batch
        self._latency_log_s = latency_log_s

    def expand(self, batches):
        stores, shards = self._config.stores, self._queue.shards
        ticks = (batches
                 | "Triggers" >> ApplyInBatches(
                     TriggerConfig(stores, self._policy, self._viral, self._queue,
                                   self._config.restore, self._loss_replay),
                     namespace=NAMESPACE, max_batch=self._trigger_batch, dead_letters="from_options")
                 | "Ticks" >> beam.FlatMap(lambda ticks: ticks)
                 .with_output_types(beam.typehints.Tuple[int, int]))
        start = (batches.pipeline
                 | "Start" >> beam.Impulse()
                 | "EveryShard" >> beam.FlatMap(lambda _: [(s, 0) for s in range(shards)])
                 .with_output_types(beam.typehints.Tuple[int, int]))
        return ((ticks, start)
                | "AllTicks" >> beam.Flatten()
                | "Drain" >> beam.ParDo(_DrainFn(stores, self._queue, self._max_batch,
                                                 self._gather_ms))
                | "Refresh" >> ApplyInBatches(
                    RefreshConfig(self._config, self._policy, self._queue, self._follow_wait,
                                  self._latency_log_s),
                    namespace=NAMESPACE, max_batch=1)
                | "Outcomes" >> beam.FlatMap(lambda outcomes: outcomes)
                .with_output_types(RefreshOutcome))


def build(pipeline: beam.Pipeline, options: PipelineOptions):
    """Wire the ranking job into ``pipeline``; returns the outcomes PCollection."""
    kafka = options.view_as(KafkaReadOptions)
    ranking = options.view_as(RankingOptions)
    # Triggers are in the queue (Redis) before the source commits their offsets:
    # a restart needs no rewind to find them.
    config = kafka.source_config(default_group=DEFAULT_GROUP)
    prefix = kafka.topic_prefix
    topics = [prefix + t.TOPIC for t in (PostEvent, EngagementEvent, FollowEvent)]
    replay = None if ranking.loss_replay_s <= 0 else LossReplay(
        dict(config.consumer_config), tuple(topics), prefix, int(ranking.loss_replay_s * 1000),
        ranking.loss_replay_max_records, config.event_limits)
    return (pipeline
            | "ReadEvents" >> ReadEventBatches(config, topics, topic_prefix=prefix)
            | "RefreshRankedFeeds" >> RefreshRankedFeeds(
                ranking.config(), ranking.policy(), ranking.queue(), ranking.viral(),
                ranking.follow_wait(), ranking.refresh_batch, ranking.refresh_gather_s,
                ranking.trigger_batch, ranking.latency_log_s, replay))


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
