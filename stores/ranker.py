"""Ranking outside Beam: events to queued triggers, and batches of users to ranked feeds.

    ranker = RankingConfig(StoreConfig(), model_dir=".state/models").open(RankingPolicy())
    outcomes = ranker.refresh([RefreshRequest(user_id=7, changed_at_ms=now_ms)])
    ranker.close()

``FeedRanker`` refreshes a batch of users: candidates, features, one batched
scoring, diversity, one batched write. ``TriggerWriter`` turns events into
triggers and queues them (``stores.redis.refresh_queue``); ``ClaimRefresher``
refreshes what the queue hands out, behind the follow gate. The ranking
pipeline holds one ``FeedRanker`` per worker process (``pipelines.ranking_pool``);
tests and benchmarks use these directly. Design: docs/pipelines/ranking.md.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import Counter
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from domain.ranking import (
    GIVE_UP,
    SETTLE,
    WAIT,
    Debounce,
    FollowWait,
    RankingPolicy,
    ViralPolicy,
    diversify,
    edge_versions_wanted,
    edges_not_applied,
    engagement_trigger,
    follow_gate,
    follow_trigger,
    merge_requests,
    post_triggers,
    requests_from,
    viral_level,
    viral_triggers,
)
from domain.ranking_features import (
    FEATURE_NAMES,
    candidate_columns,
    empty_rows,
    media_codes,
    viewer_columns,
)
from domain.social_features import SOCIAL_FEATURES
from schemas.events import EngagementEvent, FollowEvent, PostEvent
from schemas.features import AUTHOR_FEATURES, DEFAULT_HALF_LIFE_MS, POST_FEATURES
from schemas.ranked import RankedEntry, RankedFeed
from schemas.ranking import (
    RECENCY_VERSION,
    Candidate,
    CandidateColumns,
    ClaimedRefreshes,
    RefreshOutcome,
    RefreshRequest,
    Trigger,
    decode_pending,
)
from stores.config import StoreConfig
from stores.fanout import FeedStores
from stores.files.models import ModelRegistry, ModelWatcher
from stores.ranked import RankedFeedStore
from stores.redis.candidates import AudienceReader, CandidateReader
from stores.redis.features import OnlineFeatureStore
from stores.redis.refresh_queue import RefreshQueue
from stores.redis.social import SocialReader
from stores.restore import RedisHealer, RestoreSettings, open_healer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Where the stores and models are; hashable and picklable, so a pipeline keeps it
    instead of clients. ``restore``: check Redis' generation marker around each
    ranking and restore a Redis that lost its data with these settings
    (``stores.restore``; None: no check)."""

    stores: StoreConfig
    model_dir: str
    model_poll_s: float = 10.0
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    score_threads: int = 1
    #: How long parsed post and author features are reused (0: read every time).
    feature_cache_s: float = 10.0
    restore: RestoreSettings | None = None

    def open(self, policy: RankingPolicy, clock: Callable[[], float] = time.time) -> "FeedRanker":
        """A ``FeedRanker`` on new clients (one Redis client and one Cassandra session
        shared by its stores); ``FeedRanker.close()`` closes them."""
        stores = FeedStores.open(self.stores)
        feeds = stores.redis
        healer = (None if self.restore is None
                  else open_healer(self.stores, self.restore, feeds.client))
        return FeedRanker(
            CandidateReader(feeds),
            OnlineFeatureStore(feeds.client, feeds.keys, half_life_ms=self.half_life_ms),
            RankedFeedStore(feeds.client, feeds.keys, stores.cassandra),
            ModelWatcher(ModelRegistry(self.model_dir), FEATURE_NAMES, self.model_poll_s,
                         nthread=self.score_threads, social=SOCIAL_FEATURES),
            policy, clock, on_close=stores.close, feature_cache_s=self.feature_cache_s,
            healer=healer)


class Ranking(NamedTuple):
    """What ``FeedRanker.rank`` decided for a batch: the ranked ``feeds`` (one per user,
    in request order), the ``candidates`` they came from and the model ``version``."""

    version: str
    candidates: CandidateColumns
    feeds: list[RankedFeed]


class RowCache:
    """Feature rows of ``width`` values by id, each kept ``ttl_s`` (``clock``: monotonic
    seconds); at most ``max_entries`` (then emptied).

    Held as arrays (ids sorted, rows, expiry times), so a batch's lookup is
    one ``searchsorted`` and one gather, not a dict operation per id. A put
    builds new arrays and swaps them in whole under a lock; a ``get`` reads
    whichever arrays are current, so threads may share it.
    """

    def __init__(self, ttl_s: float, width: int, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.width = width
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._held = (np.zeros(0, np.int64), np.zeros((0, width)), np.zeros(0))

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, missing)`` of ``ids``: one row per id (NaN where not held fresh),
        and the mask of the ids without a fresh row."""
        held_ids, rows, expires = self._held
        ids = np.asarray(ids, np.int64)
        at = np.minimum(np.searchsorted(held_ids, ids), max(len(held_ids) - 1, 0))
        if len(held_ids):
            hit = (held_ids[at] == ids) & (expires[at] > self._clock())
        else:
            hit = np.zeros(len(ids), bool)
        out = np.full((len(ids), self.width), np.nan)
        out[hit] = rows[at[hit]]
        return out, ~hit

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Keep ``rows`` (one per id, ids unique) for ``ttl_s``."""
        if self.ttl_s <= 0 or not len(ids):
            return
        ids = np.asarray(ids, np.int64)
        with self._lock:
            now = self._clock()
            held_ids, held_rows, expires = self._held
            keep = (expires > now) & ~np.isin(held_ids, ids)
            if keep.sum() + len(ids) > self.max_entries:
                keep[:] = False
            all_ids = np.concatenate([held_ids[keep], ids])
            order = np.argsort(all_ids, kind="stable")
            self._held = (all_ids[order],
                          np.concatenate([held_rows[keep],
                                          np.asarray(rows, np.float64).reshape(-1, self.width)]
                                         )[order],
                          np.concatenate([expires[keep], np.full(len(ids), now + self.ttl_s)]
                                         )[order])

    def drop(self, ids) -> None:
        """Forget ``ids`` (read again on their next ``get``)."""
        ids = np.fromiter(ids, np.int64)
        if not len(ids):
            return
        with self._lock:
            held_ids, rows, expires = self._held
            gone = np.isin(held_ids, ids)
            if gone.any():
                expires = expires.copy()
                expires[gone] = 0.0
                self._held = (held_ids, rows, expires)


class FeedRanker:
    """Refreshes ranked feeds of a batch of users: candidates and features of the whole
    batch in a fixed number of pipelined Redis round trips, ONE scoring call, diversity
    per user, ONE batched write. ``clock`` returns epoch seconds.

    Post and author features, the same for every viewer, are parsed once per
    ``feature_cache_s`` (the features pipeline rewrites them once per slide);
    a post named by a viral trigger is read again at once. Each store call is
    one attempt: a transient error fails the whole ``refresh``, which the
    caller may run again (every write is idempotent: a ranking replaces the
    previous one, the newer generation time wins). The clients are
    thread-safe, so one ranker may serve several threads.

    With a ``healer`` a batch is ranked on a whole Redis only
    (``RedisHealer.run_whole``: one marker read per batch): a Redis that lost
    its data is restored from Cassandra, and the batch ranked again, before
    any feed of it is written.
    """

    def __init__(self, candidates: CandidateReader, features: OnlineFeatureStore,
                 ranked: RankedFeedStore, models: ModelWatcher | None, policy: RankingPolicy,
                 clock: Callable[[], float] = time.time,
                 on_close: Callable[[], None] | None = None, feature_cache_s: float = 10.0,
                 healer: RedisHealer | None = None):
        self.candidates = candidates
        self.healer = healer
        self.features = features
        self.ranked = ranked
        self.models = models
        self.policy = policy
        self._clock = clock
        self._on_close = on_close
        self.social = (None if features is None
                       else SocialReader(features.client, features.keys))
        self._post_rows = RowCache(feature_cache_s, len(POST_FEATURES))
        self._author_rows = RowCache(feature_cache_s, len(AUTHOR_FEATURES))
        #: Scoring calls that failed (the batch was ranked by recency instead).
        self.model_errors = 0
        #: Posts remembered for a user's next rankings, the fan-out not having stored
        #: them yet (``carry``).
        self.carried = 0

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def refresh(self, requests: Sequence[RefreshRequest]) -> list[RefreshOutcome]:
        """Rank and write the feed of every requested user: one outcome per user, in the
        order users first appear (requests of one user are merged, ``merge_requests``)."""
        requests = merge_requests(requests)
        if self.healer is None:
            ranking = self.rank(requests, self.now_ms())
        else:
            ranking = self.healer.run_whole(lambda: self.rank(requests, self.now_ms()))
        self.ranked.write_many(ranking.feeds)
        self.carry(ranking.candidates, self.now_ms(),
                   {r.user_id: r.deleted for r in requests if r.deleted})
        offsets = ranking.candidates.offsets
        return [RefreshOutcome(r.user_id, ranking.version, len(f.entries),
                               int(offsets[i + 1] - offsets[i]), r.changed_at_ms,
                               f.generated_at_ms, r.triggers)
                for i, (r, f) in enumerate(zip(requests, ranking.feeds))]

    def carry(self, cols: CandidateColumns, now_ms: int,
              deleted: dict[int, frozenset] | None = None) -> None:
        """Remember the new posts each user's candidates had only from triggers (the
        fan-out had not stored them), younger than ``policy.carry_unstored_ms``: the
        user's next rankings take them too (``CandidateReader.columns``). Without it a
        ranking in between (a like, before the fan-out's push) dropped such a post,
        and nothing ranked the user again once the fan-out had caught up. Posts the
        requests deleted (``deleted``, per user) are forgotten: the next ranking must
        not bring back a post whose deletion the fan-out has not stored yet."""
        ttl = self.policy.carry_unstored_ms
        if ttl <= 0 or cols.unstored is None:
            return
        rows = np.flatnonzero(cols.unstored & (cols.created_at >= now_ms - ttl))
        user_at = np.searchsorted(cols.offsets, rows, side="right") - 1
        posts: dict[int, list[Candidate]] = {}
        for k, i in zip(rows.tolist(), user_at.tolist()):
            posts.setdefault(cols.users[i], []).append(Candidate(
                int(cols.post_id[k]), int(cols.author_id[k]), int(cols.created_at[k]),
                str(cols.media[k])))
        self.candidates.carry(posts, ttl, deleted)  # no round trip when both are empty
        self.carried += len(rows)

    def rank(self, requests: Sequence[RefreshRequest], now_ms: int) -> Ranking:
        """The ranked feeds of ``requests`` (one per user) as of ``now_ms``, not written."""
        self._post_rows.drop({p for r in requests for p in r.reread})
        cols = self.candidates.columns(requests, now_ms, self.policy)
        version, scores = self.score(cols, now_ms)
        p = self.policy
        post_ids, author_ids, values = (cols.post_id.tolist(), cols.author_id.tolist(),
                                        scores.tolist())
        feeds = []
        for i, user in enumerate(cols.users):
            a, b = int(cols.offsets[i]), int(cols.offsets[i + 1])
            entries = list(map(RankedEntry, post_ids[a:b], author_ids[a:b], values[a:b]))
            feeds.append(RankedFeed(user, tuple(diversify(entries, p.top_k, p.max_per_author,
                                                          p.no_adjacent)), version, now_ms))
        return Ranking(version, cols, feeds)

    def score(self, cols: CandidateColumns, now_ms: int) -> tuple[str, np.ndarray]:
        """``(model version, one score per candidate row)``.

        Every row of the batch goes through the model in one ``inplace_predict``;
        without a usable model (or if scoring fails) the scores are the creation
        times and the version is ``RECENCY_VERSION``.
        """
        model = self.models.current() if self.models is not None else None
        if model is not None:
            rows = self.feature_rows(cols, now_ms)
            if model.community is not None:
                rows = np.hstack([rows, self.social_rows(cols, now_ms, model.community)
                                  .astype(np.float32)])
            try:
                return model.version, np.asarray(model.predict(rows), dtype=np.float64)
            except Exception as exc:  # a broken model must not stop the feeds: rank by recency
                self.model_errors += 1
                log.error("ranking: model %s failed to score, ranking by recency: %s",
                          model.version, exc)
        return RECENCY_VERSION, cols.created_at.astype(np.float64)

    def feature_rows(self, cols: CandidateColumns, now_ms: int) -> np.ndarray:
        """The ``FEATURE_NAMES`` rows of every candidate of the batch.

        Each distinct post and author is read once (not at all while cached),
        each viewer's affinities once, and rows are gathered from those by
        index, so the work per candidate is NumPy's. The viewers' reads go to
        Redis first (``OnlineFeatureStore.send_viewers``), then the reads of the
        posts and authors not cached; the rest is worked out while Redis
        answers.
        """
        row_user = _row_users(cols)
        posts, post_at = cols.distinct_posts()
        some_row = np.empty(len(posts), np.intp)
        some_row[post_at] = np.arange(len(post_at))  # any row of a post: all carry its fields
        authors, post_author = np.unique(cols.author_id[some_row], return_inverse=True)
        # Each row's affinity of its viewer to its author, found in the viewer's records.
        with self.features.send_viewers(list(cols.users), authors, post_author[post_at],
                                        cols.offsets, now_ms) as pending:
            post_rows, post_missing = self._post_rows.get(posts)
            author_rows, author_missing = self._author_rows.get(authors)
            pending.send_entities(posts[post_missing].tolist(), authors[author_missing].tolist())
            media = media_codes(cols.media[some_row])
            f = pending.result()
        if post_missing.any() or author_missing.any():
            post_rows[post_missing] = f.posts
            author_rows[author_missing] = f.authors
            self._post_rows.put(posts[post_missing], f.posts)
            self._author_rows.put(authors[author_missing], f.authors)
        # The candidate's own columns once per post, then one gather of whole rows.
        per_post = empty_rows(len(posts))
        candidate_columns(per_post, post_rows, author_rows[post_author], media,
                          now_ms - cols.created_at[some_row])
        out = per_post[post_at]
        viewer_columns(out, f.affinity, f.content, row_user, media[post_at])
        return out

    def social_rows(self, cols: CandidateColumns, now_ms: int,
                    community: Mapping[int, int]) -> np.ndarray:
        """The ``SOCIAL_FEATURES`` rows of every candidate of the batch (one round trip,
        ``SocialReader.rows``), for a model trained with them."""
        return self.social.rows(list(cols.users), _row_users(cols), cols.post_id,
                                cols.author_id, cols.created_at, now_ms, community)


def _row_users(cols: CandidateColumns) -> np.ndarray:
    """Per candidate row, the index of its user in ``cols.users``."""
    return np.repeat(np.arange(len(cols.users)), np.diff(cols.offsets))


# --------------------------------------------------------------------------- triggers


class TriggerResult(NamedTuple):
    """What ``TriggerWriter.apply`` queued: ``due`` per shard written (earliest due ms),
    ``reasons`` triggers by reason, ``quiet`` events that made no feed stale,
    ``viral_posts`` posts whose new engagement level re-ranked their audience."""

    due: dict[int, int]
    reasons: Counter
    quiet: int
    viral_posts: int


class TriggerWriter:
    """Events -> the users whose ranked feed each makes stale -> the pending-refresh queue.

    Per call, whatever the number of events: the engaged posts' features (one
    round trip), their new viral levels (one), the audiences of the posts'
    and viral posts' authors (``AudienceReader``: three), the viral rate limit
    (one) and the queue (one). With a ``healer``, one read of Redis' generation
    marker: triggers are worked out on a whole Redis only (a post's audience
    from a wiped graph would be nobody), the call run again on the restored
    Redis otherwise (``RedisHealer.run_whole``).
    """

    def __init__(self, audiences: AudienceReader, features: OnlineFeatureStore,
                 queue: RefreshQueue, policy: RankingPolicy, viral: ViralPolicy = ViralPolicy(),
                 clock: Callable[[], float] = time.time, healer: RedisHealer | None = None):
        self.audiences = audiences
        self.features = features
        self.queue = queue
        self.policy = policy
        self.viral = viral
        self._clock = clock
        self.healer = healer

    def apply(self, events: Sequence[object]) -> TriggerResult:
        if self.healer is None:
            return self._apply(events)
        return self.healer.run_whole(lambda: self._apply(events))

    def _apply(self, events: Sequence[object]) -> TriggerResult:
        now_ms = int(self._clock() * 1000)
        triggers: list[Trigger] = []
        quiet = 0
        posts: list[PostEvent] = []
        engaged: dict[int, tuple[int, int]] = {}  # post -> (author, latest event time)
        for e in events:
            if isinstance(e, PostEvent):
                posts.append(e)
                continue
            if isinstance(e, FollowEvent):
                t = follow_trigger(e)
            elif isinstance(e, EngagementEvent):
                t = engagement_trigger(e)
                if t is not None and e.post_id is not None:
                    held = engaged.get(e.post_id)
                    engaged[e.post_id] = (e.author_id, max(e.event_time, held[1] if held else 0))
            else:
                t = None
            if t is None:
                quiet += 1
            else:
                triggers.append(t)
        viral = self._viral(engaged, now_ms)
        authors: dict[int, int] = {}
        for e in posts:
            authors[e.author_id] = max(e.event_time, authors.get(e.author_id, 0))
        for _, (author, at) in viral.items():
            authors[author] = max(at, authors.get(author, 0))
        audience = self.audiences.audiences(authors, self.policy)
        for e in posts:
            made = post_triggers(e, audience[e.author_id])
            quiet += not made
            triggers += made
        for post_id, (author, at) in viral.items():
            users = self.queue.admit_viral(audience[author], self.viral.user_interval_ms)
            triggers += viral_triggers(post_id, author, at, users)
        return TriggerResult(self.queue.add(triggers, now_ms),
                             Counter(t.reason for t in triggers), quiet, len(viral))

    def _viral(self, engaged: dict[int, tuple[int, int]], now_ms: int
               ) -> dict[int, tuple[int, int]]:
        """The engaged posts that reached a new engagement level: ``{post: (author, at)}``."""
        if not engaged or not self.viral.enabled:
            return {}
        ids = list(engaged)
        levels = [(p, viral_level(f, self.viral))
                  for p, f in zip(ids, self.features.post_features(ids, now_ms))]
        raised = self.queue.raise_levels([(p, lv) for p, lv in levels if lv > 0],
                                         self.features.ttls.post_ms)
        return {p: engaged[p] for p in raised}


# --------------------------------------------------------------------------- claims


class ClaimResult(NamedTuple):
    """What ``ClaimRefresher.apply`` did: ``outcomes`` of the feeds written, ``waits``
    refreshes the follow gate put off, ``give_ups`` refreshes that stopped waiting."""

    outcomes: list[RefreshOutcome]
    waits: int
    give_ups: int


class ClaimRefresher:
    """Refreshes the users the pending-refresh queue handed out (``ClaimedRefreshes``).

    Per claim: users whose triggers include follows or unfollows first pass
    the follow gate (``follow_gate``: the fan-out's graph must hold those
    edges, read in one round trip for the claim); the others, and those the
    gate lets through, are refreshed together (``FeedRanker.refresh``); then
    one ``RefreshQueue.finish`` drops the triggers the refresh covered and
    puts the waiting users off with theirs. A failure before ``finish`` leaves
    the claim leased: it is handed out again when the lease ends, and the
    refresh, idempotent, runs again.
    """

    def __init__(self, ranker: FeedRanker, queue: RefreshQueue,
                 follow_wait: FollowWait | None = FollowWait(),
                 wall: Callable[[], float] = time.time):
        self.ranker = ranker
        self.queue = queue
        self.follow_wait = follow_wait
        self._wall = wall

    def apply(self, claims: Sequence[ClaimedRefreshes]) -> ClaimResult:
        outcomes: list[RefreshOutcome] = []
        waits = give_ups = 0
        for claim in claims:
            done, deferred, gave_up = self._one(claim, outcomes)
            waits += len(deferred)
            give_ups += gave_up
        return ClaimResult(outcomes, waits, give_ups)

    def _one(self, claim: ClaimedRefreshes, outcomes: list[RefreshOutcome]):
        pending = [(u, *_decode(u, text)) for u, text in zip(claim.users, claim.payloads)]
        wanted = {u: edge_versions_wanted(ts) for u, _, ts in pending}
        waiting = {u: _parse_wait(w) for u, w in zip(claim.users, claim.waits) if w}
        now = int(self._wall() * 1000)
        deferred: list[tuple[int, int, str]] = []
        gave_up = 0
        ready = []
        if self.follow_wait is not None:
            stored = self.ranker.candidates.edge_versions(
                {u: list(wanted[u]) for u, _, _ in pending if wanted[u] or u in waiting})
        for u, seq, ts in pending:
            if self.follow_wait is not None and (wanted[u] or u in waiting):
                since, checks = waiting.get(u, (None, 0))
                unapplied = edges_not_applied(wanted[u], stored.get(u, {}))
                decision = follow_gate(self.follow_wait, unapplied, since, now)
                if decision == WAIT:
                    checks += 1
                    deferred.append((u, now + self.follow_wait.retry_delay(checks),
                                     f"{now if since is None else since},{checks}"))
                    continue
                if decision == SETTLE:
                    deferred.append((u, now + self.follow_wait.retry_ms, ""))
                    continue
                if decision == GIVE_UP:
                    gave_up += 1
                    log.warning("ranking: user %d refreshed without the fan-out's edges to %s "
                                "after waiting %.0f s", u, unapplied,
                                self.follow_wait.max_wait_ms / 1000)
            ready.append((u, seq, ts))
        requests = [requests_from(u, ts) if ts else RefreshRequest(u, claim.claimed_at_ms, triggers=0)
                    for u, _, ts in ready]
        if requests:
            outcomes += self.ranker.refresh(requests)
        self.queue.finish(claim.shard, [(u, seq) for u, seq, _ in ready], deferred,
                          int(self._wall() * 1000))
        return ready, deferred, gave_up


def _decode(user_id: int, text: str) -> tuple[int, list[Trigger]]:
    """``decode_pending``, and for text it cannot read (a bug: the queue writes it) the
    user refreshed with no triggers and that text dropped, logged: a bad line must
    not fail every refresh of its batch for ever."""
    try:
        return decode_pending(user_id, text)
    except (ValueError, IndexError):
        log.error("ranking: unreadable queued triggers of user %d, refreshing without "
                  "them: %r", user_id, text[:200])
        heads = re.findall(r"^#(\d+)$", text, re.M)
        return max(map(int, heads), default=0), []


def _parse_wait(text: str) -> tuple[int, int]:
    since, checks = text.split(",")
    return int(since), int(checks)


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    """How the pending-refresh queue is laid out and timed (picklable):
    ``RefreshQueue``'s ``shards``, ``debounce`` and ``lease_ms``."""

    shards: int = 4
    debounce: Debounce = Debounce()
    lease_ms: int = 30_000

    def open(self, client, keys) -> RefreshQueue:
        return RefreshQueue(client, keys, self.shards, self.debounce, self.lease_ms)
