"""ranking: keep every user's ranked feed fresh, debounced, in Redis and Cassandra.

    python -m pipelines.ranking --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming --model_dir .state/models \\
        [--settle_s 0.5 --debounce_s 5 --max_candidates 200 --top_k 20 --max_per_author 3]

Reads ``post-events``, ``engagement-events`` and ``follow-events`` (consumer
group ``feedbeam-ranking``) and, through ``RefreshRankedFeeds``:

1. **Triggers** (stateless, fused with the read): each event names the users
   whose ranked feed it makes stale (``ranking_logic``):

   * a post CREATED or DELETED: the author's active followers, every one of
     them, below or above the push threshold: their candidates changed (a
     pushed entry, or a pulled celebrity post). Followers are read from the
     graph the fan-out keeps in Redis; the trigger carries the post, so the
     refresh ranks a new post even if the fan-out has not pushed it yet, and
     never ranks a deleted one the fan-out has not removed yet. The
     followers are those the graph holds when the trigger runs: a post
     that races its author's newest follow (edge not written yet) is not a
     trigger for that follower; the follow's own refresh covers it (below);
   * a FOLLOW or UNFOLLOW: the follower (followees changed). Its refresh
     waits until the fan-out's graph in Redis holds the edge, plus
     ``--follow_retry_s`` for the merge of the followee's recent posts that
     follows it (checks back off to ``--follow_max_retry_s``; at most
     ``--follow_wait_s`` of wall time, then it refreshes anyway): while the
     fan-out is behind (a backlog), a refresh would otherwise rank a feed the
     follows have not reached yet and nothing would refresh it again;
   * a LIKE, COMMENT, SHARE or SAVE: the viewer, whose affinities (the
     features that matter most) moved materially. Views, unlikes and profile
     views do not trigger: they are most of the traffic and move features
     little; the next refresh of the user reads them anyway. Post-level
     features (counts, rates) are read fresh by every refresh.

   Why events and not the derived stores: the topics are the one ordered,
   replayable record of what changed; reading them needs no change feed from
   the other pipelines, and a restarted job re-derives its triggers.
2. **Debounce** (stateful, keyed by user, event-time timers): a user's first
   change waits ``--settle_s`` (a burst coalesces, the fan-out writes
   meanwhile), then the feed is refreshed and the user cools down for
   ``--debounce_s``: changes in that time are refreshed together when it
   ends. So a user is refreshed at most once per ``--debounce_s``, and no
   change waits longer than ``max(settle, debounce)`` plus the watermark's
   lag. Event time (the source's watermark moves on idle partitions, so
   timers fire when traffic stops) keeps tests and replays deterministic;
   ``--debounce_clock processing`` uses processing-time timers instead, which
   saves the watermark's lag (about a second with the default idle skew).
3. **Refresh** (batched per bundle, up to ``--refresh_batch`` users): candidates
   of all users in a few Redis round trips (``CandidateReader``: pushed feed +
   recent posts of followed celebrities, ~200 per user), features with
   ``OnlineFeatureStore.hydrate``: the posts' and authors' once for the
   batch (users share most candidates), each user's affinities in one read
   per user; ONE ``inplace_predict`` over the
   candidates of every user in the batch, diversity re-ranking per user
   (``--top_k``, ``--max_per_author``, ``--no_adjacent``), and
   ``RankedFeedStore.write`` (Redis swap + Cassandra row, newer wins) with
   the model version. With no model promoted yet (or none usable), the feed
   is ranked by recency and its version is ``recency``.

The model is whatever ``latest`` in ``--model_dir`` names
(``stores.files.models``); each worker re-reads the pointer every
``--model_poll_s`` and swaps to a new version without a restart.

Delivery: the stateful step follows a shuffle, so the source's offsets are
committed once the triggers are in the runner's state, not when refreshed;
``--rewind_s`` defaults to the debounce horizon so a restarted job re-reads
what a lost state may have held. Refreshes are idempotent (a ranking replaces
the previous one, newer generation time wins). Metrics in
``feedbeam.ranking``: ``triggers_<reason>``, ``refreshes``,
``refreshes_model``, ``refreshes_recency``, ``follow_waits``,
``follow_wait_timeouts``, ``candidates`` and
``refresh_latency_ms`` (event time of the change to the write) distributions,
gauges ``model_swaps`` and ``model_errors`` (scoring failed: ranked by
recency) per worker process, batch retries.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Callable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.fanout import FanoutOptions, StoreConfig, _transient_errors
from domain.fanout import FreshnessHistogram
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import ReadEvents
from domain.ranking_features import FEATURE_NAMES, feature_matrix, online_columns
from domain.ranking import (
    GIVE_UP,
    SETTLE,
    WAIT,
    Debounce,
    FollowWait,
    RankingPolicy,
    diversify,
    edge_versions_wanted,
    edges_not_applied,
    engagement_trigger,
    follow_gate,
    follow_trigger,
    merge_requests,
    post_triggers,
    recency_scores,
    requests_from,
)
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, FollowEvent, PostEvent
from schemas.features import DEFAULT_HALF_LIFE_MS
from schemas.ranked import RankedEntry
from schemas.ranking import (
    RECENCY_VERSION,
    Candidate,
    RefreshOutcome,
    RefreshRequest,
    Trigger,
)


if __name__ == "__main__":
    # `python -m pipelines.ranking`: run the importable module, not this __main__
    # copy: Beam pickles transforms and coders by reference to their module, and
    # options classes defined a second time would clash.
    from pipelines.ranking import main

    sys.exit(main())

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.ranking"
DEFAULT_GROUP = "feedbeam-ranking"
#: Time domains of the debounce timers (``--debounce_clock``).
CLOCKS = ("event", "processing")


# --------------------------------------------------------------------------- options


class RankingOptions(PipelineOptions):
    """Options of the ranking pipeline (Kafka settings are ``KafkaReadOptions``)."""

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
        # The stores (--redis_url, --redis_key_prefix, --cassandra_*), --push_threshold
        # and --inactive_days are FanoutOptions': the same settings as the fan-out's
        # (Beam parses one flat namespace, so they are declared once).

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

    def config(self) -> "RankingConfig":
        if self.model_dir is None:
            raise ValueError("--model_dir is not set (run() defaults it from FEEDBEAM_STATE_DIR)")
        return RankingConfig(
            self.view_as(FanoutOptions).stores(), model_dir=self.model_dir, model_poll_s=self.model_poll_s,
            half_life_ms=int(self.feature_half_life_days * 86_400_000))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# --------------------------------------------------------------------------- stores


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Where the stores and models are; pickled into the DoFns instead of clients."""

    stores: StoreConfig
    model_dir: str
    model_poll_s: float = 10.0
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    score_threads: int = 1
    io_threads: int = 8

    def open(self, policy: RankingPolicy, clock: Callable[[], float] = time.time) -> "FeedRanker":
        """A ``FeedRanker`` on new clients (one Redis client and one Cassandra session
        shared by its stores); ``FeedRanker.close()`` closes them."""
        from stores.redis.candidates import CandidateReader
        from stores.redis.features import OnlineFeatureStore
        from stores.files.models import ModelRegistry, ModelWatcher
        from stores.ranked import RankedFeedStore

        stores = self.stores.open()
        feeds = stores.redis
        return FeedRanker(
            CandidateReader(feeds),
            OnlineFeatureStore(feeds.client, feeds.keys, half_life_ms=self.half_life_ms),
            RankedFeedStore(feeds.client, feeds.keys, stores.cassandra),
            ModelWatcher(ModelRegistry(self.model_dir), FEATURE_NAMES, self.model_poll_s,
                         nthread=self.score_threads),
            policy, clock, on_close=stores.close, io_threads=self.io_threads)


# --------------------------------------------------------------------------- refreshing


class FeedRanker:
    """Refreshes ranked feeds: candidates, features, one batched scoring, diversity,
    write (no Beam; the DoFn adapts it). ``clock`` returns epoch seconds.

    The per-user store calls (one feature hydrate, one ranked-feed write) of a
    batch run on ``io_threads`` threads: they wait on the network, so their
    round trips overlap instead of adding up. The stores' clients are
    thread-safe (a Redis connection pool, one Cassandra session).
    """

    def __init__(self, candidates, features, ranked, models, policy: RankingPolicy,
                 clock: Callable[[], float] = time.time, on_close: Callable[[], None] = None,
                 io_threads: int = 8):
        from concurrent.futures import ThreadPoolExecutor

        self.candidates = candidates
        self.features = features
        self.ranked = ranked
        self.models = models
        self.policy = policy
        self._clock = clock
        self._on_close = on_close
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="ranking-io")
        self.model_errors = 0

    def close(self) -> None:
        self._io.shutdown(wait=True)
        if self._on_close is not None:
            self._on_close()

    def refresh(self, requests: Sequence[RefreshRequest]) -> list[RefreshOutcome]:
        """Rank and write the feed of every requested user (one outcome per user)."""
        requests = merge_requests(requests)
        now_ms = int(self._clock() * 1000)
        by_user = self.candidates.read(requests, now_ms, self.policy)
        users = [r.user_id for r in requests]
        version, scores = self.score(users, by_user, now_ms)
        ranked = {user: diversify([RankedEntry(c.post_id, c.author_id, float(s))
                                   for c, s in zip(by_user[user], scores[user])],
                                  self.policy.top_k, self.policy.max_per_author,
                                  self.policy.no_adjacent)
                  for user in users}
        # list(): wait for every write (and raise the first error) before reporting.
        list(self._io.map(lambda u: self.ranked.write(u, ranked[u], version, now_ms), users))
        return [RefreshOutcome(r.user_id, version, len(ranked[r.user_id]),
                               len(by_user[r.user_id]), r.changed_at_ms, now_ms, r.triggers)
                for r in requests]

    def score(self, users: Sequence[int], by_user: dict[int, list[Candidate]], now_ms: int
              ) -> tuple[str, dict[int, np.ndarray]]:
        """``(model version, scores per user aligned with its candidates)``.

        All users' candidates go through the model in one ``inplace_predict``;
        without a usable model (or if scoring fails) the scores are the
        creation times and the version is ``RECENCY_VERSION``.
        """
        model = self.models.current() if self.models is not None else None
        if model is not None:
            blocks = self.features_of(users, by_user, now_ms)
            try:
                flat = model.predict(np.concatenate(blocks) if blocks else
                                     np.zeros((0, len(FEATURE_NAMES)), np.float32))
            except Exception as exc:  # a broken model must not stop the feeds: rank by recency
                self.model_errors += 1
                log.error("ranking: model %s failed to score, ranking by recency: %s",
                          model.version, exc)
            else:
                offsets = np.cumsum([0] + [len(b) for b in blocks])
                return model.version, {u: flat[offsets[i]:offsets[i + 1]]
                                       for i, u in enumerate(users)}
        return RECENCY_VERSION, {u: recency_scores(by_user[u]) for u in users}

    def features_of(self, users: Sequence[int], by_user: dict[int, list[Candidate]],
                    now_ms: int) -> list[np.ndarray]:
        """The feature rows of each user's candidates.

        Post and author features do not depend on the viewer and the users of
        a batch share most candidates, so they are read once for the batch (one
        round trip); each user's own affinities are then one round trip per
        user (on the I/O threads).
        """
        posts = list(dict.fromkeys(c.post_id for u in users for c in by_user[u]))
        authors = list(dict.fromkeys(c.author_id for u in users for c in by_user[u]))
        shared = self.features.hydrate(None, posts, authors, now_ms)
        post_features = dict(zip(posts, shared.posts))
        author_features = dict(zip(authors, shared.authors))

        def rows(user: int) -> np.ndarray:
            cands = by_user[user]
            if not cands:
                return np.zeros((0, len(FEATURE_NAMES)), np.float32)
            mine = list(dict.fromkeys(c.author_id for c in cands))
            viewer = self.features.hydrate(user, (), mine, now_ms, author_features=False)
            affinity = dict(zip(mine, viewer.author_affinity))
            post_cols, author_cols = online_columns(
                [post_features[c.post_id] for c in cands],
                [author_features[c.author_id] for c in cands])
            n = len(cands)
            media = np.array([c.media_type for c in cands], dtype=object)
            per_media = {m: np.full(n, v) for m, v in viewer.content_affinity.items()}
            age = now_ms - np.fromiter((c.created_at for c in cands), np.int64, count=n)
            return feature_matrix(post_cols, author_cols,
                                  np.array([affinity[c.author_id] for c in cands]), per_media,
                                  media, age)

        return list(self._io.map(rows, users))


# --------------------------------------------------------------------------- Beam


class _Counters:
    """Beam counters created on first use."""

    def __init__(self):
        self._counters = {}

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(n)


class _TriggersFn(beam.DoFn):
    """Event -> ``(user_id, Trigger)`` for every user whose ranked feed it makes stale."""

    def __init__(self, stores: StoreConfig, policy: RankingPolicy):
        self._store_config = stores
        self._policy = policy

    def setup(self):
        from stores.redis.feeds import RedisFeedStore

        c = self._store_config
        self._feeds = RedisFeedStore.from_url(c.redis_url, key_prefix=c.redis_key_prefix)
        self._counters = _Counters()

    def teardown(self):
        feeds = getattr(self, "_feeds", None)
        if feeds is not None:
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


class _RefreshFn(beam.DoFn):
    """Buffers refresh requests and refreshes them in batches with ``FeedRanker``.

    One ``FeedRanker`` per worker process and configuration, shared by every
    instance of this DoFn there (``pipelines.ranking_pool``): a runner runs several
    bundles at once, each on its own DoFn instance, and a ranker holds a
    model, a Cassandra session and a Redis pool that take seconds to build and
    are thread-safe. The first ``setup()`` builds it from ``RankingConfig``,
    the last ``teardown()`` closes it. A batch that fails with a transient
    store error is retried whole with exponential backoff (refreshes are
    idempotent); after ``attempts`` the bundle fails.
    """

    def __init__(self, config: RankingConfig, policy: RankingPolicy, max_batch: int = 256,
                 attempts: int = 4, backoff_s: float = 0.5, latency_log_s: float = 60.0):
        self._config = config
        self._policy = policy
        self._max_batch = max_batch
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._latency_log_s = latency_log_s

    def setup(self):
        # Imported here, not at module level: run as `python -m pipelines.ranking`
        # this class lives in __main__ and is pickled by value with the globals
        # it uses; the pool (live clients) must not be one of them.
        from pipelines.ranking_pool import RANKERS

        self._ranker = RANKERS.hold(self._config, self._policy)
        self._transient = _transient_errors()
        self._counters = _Counters()
        self._latency = Metrics.distribution(NAMESPACE, "refresh_latency_ms")
        self._histogram = FreshnessHistogram(self._latency_log_s, now_s=time.monotonic())
        self._batch_ms = FreshnessHistogram(self._latency_log_s, now_s=time.monotonic())
        self._candidates = Metrics.distribution(NAMESPACE, "candidates")
        self._swaps = Metrics.gauge(NAMESPACE, "model_swaps")
        self._errors = Metrics.gauge(NAMESPACE, "model_errors")

    def teardown(self):
        from pipelines.ranking_pool import RANKERS

        if getattr(self, "_ranker", None) is not None:
            self._ranker = None
            RANKERS.release(self._config, self._policy)

    def start_bundle(self):
        self._pending: list[tuple[RefreshRequest, object, object]] = []

    def process(self, request, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        self._pending.append((request, timestamp, window))
        if len(self._pending) >= self._max_batch:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        started = time.monotonic()
        outcomes = self._refresh_with_retries([r for r, _, _ in pending])
        self._batch_ms.add((time.monotonic() - started) * 1000)
        stamps = {r.user_id: (ts, w) for r, ts, w in pending}
        for o in outcomes:
            self._record(o)
            ts, w = stamps[o.user_id]
            yield WindowedValue(o, ts, [w])
        # Gauges: the shared ranker's totals since the process started.
        self._swaps.set(self._ranker.models.swaps)
        self._errors.set(self._ranker.model_errors)
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if not self._histogram.due(now):
            return
        latency, batches = self._histogram.flush(now), self._batch_ms.flush(now)
        if latency and batches:
            log.info("ranking over the last %.0fs: %d refreshes in %d batches (batch p50 %.0f ms, "
                     "p99 %.0f ms); change to ranked feed p50 %.0f ms, p99 %.0f ms",
                     self._latency_log_s, latency[0], batches[0], batches[1], batches[2],
                     latency[1], latency[2])

    def _refresh_with_retries(self, requests: list[RefreshRequest]) -> list[RefreshOutcome]:
        for attempt in range(1, self._attempts + 1):
            try:
                outcomes = self._ranker.refresh(requests)
                self._counters.inc("batches")
                return outcomes
            except self._transient as exc:
                if attempt == self._attempts:
                    self._counters.inc("batch_failures")
                    raise
                self._counters.inc("batch_retries")
                delay = self._backoff_s * 2 ** (attempt - 1)
                log.warning("ranking: transient store error (attempt %d/%d), retrying the batch "
                            "of %d users in %.1fs: %s", attempt, self._attempts, len(requests),
                            delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _record(self, o: RefreshOutcome) -> None:
        self._counters.inc("refreshes")
        self._counters.inc("refreshes_recency" if o.model_version == RECENCY_VERSION
                           else "refreshes_model")
        self._candidates.update(o.candidates)
        latency = max(0, o.generated_at_ms - o.changed_at_ms)
        self._latency.update(latency)
        self._histogram.add(latency)


class RefreshRankedFeeds(beam.PTransform):
    """Keep the ranked feeds of the users that events concern fresh (see module doc).

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
                | "Refresh" >> beam.ParDo(_RefreshFn(self._config, self._policy, self._max_batch,
                                                     latency_log_s=self._latency_log_s))
                .with_output_types(RefreshOutcome))


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


def main(argv=None) -> int:
    """``python -m pipelines.ranking``: log at INFO, run until the job ends or is cancelled."""
    # force: importing Beam already configured the root logger (at WARNING),
    # which would silence the model-swap lines.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    run(sys.argv[1:] if argv is None else argv)
    return 0
