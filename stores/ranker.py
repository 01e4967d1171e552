"""Refreshing ranked feeds outside Beam: candidates, features, scoring, diversity, write.

    ranker = RankingConfig(StoreConfig(), model_dir=".state/models").open(RankingPolicy())
    outcomes = ranker.refresh([RefreshRequest(user_id=7, changed_at_ms=now_ms)])
    ranker.close()

The ranking pipeline's refresh step holds one ``FeedRanker`` per worker
process (``pipelines.ranking_pool``); tests and benchmarks use it directly.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from domain.ranking import RankingPolicy, diversify, merge_requests, recency_scores
from domain.ranking_features import FEATURE_NAMES, feature_matrix, online_columns
from schemas.features import DEFAULT_HALF_LIFE_MS
from schemas.ranked import RankedEntry
from schemas.ranking import RECENCY_VERSION, Candidate, RefreshOutcome, RefreshRequest
from stores.config import StoreConfig
from stores.fanout import FeedStores
from stores.files.models import ModelRegistry, ModelWatcher
from stores.ranked import RankedFeedStore
from stores.redis.candidates import CandidateReader
from stores.redis.features import OnlineFeatureStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Where the stores and models are, and how many threads a ranker uses; hashable and
    picklable, so a pipeline keeps it instead of clients."""

    stores: StoreConfig
    model_dir: str
    model_poll_s: float = 10.0
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    score_threads: int = 1
    io_threads: int = 8

    def open(self, policy: RankingPolicy, clock: Callable[[], float] = time.time) -> "FeedRanker":
        """A ``FeedRanker`` on new clients (one Redis client and one Cassandra session
        shared by its stores); ``FeedRanker.close()`` closes them."""
        stores = FeedStores.open(self.stores)
        feeds = stores.redis
        return FeedRanker(
            CandidateReader(feeds),
            OnlineFeatureStore(feeds.client, feeds.keys, half_life_ms=self.half_life_ms),
            RankedFeedStore(feeds.client, feeds.keys, stores.cassandra),
            ModelWatcher(ModelRegistry(self.model_dir), FEATURE_NAMES, self.model_poll_s,
                         nthread=self.score_threads),
            policy, clock, on_close=stores.close, io_threads=self.io_threads)


class FeedRanker:
    """Refreshes ranked feeds: candidates, features, one batched scoring, diversity,
    write. ``clock`` returns epoch seconds.

    Each store call is one attempt: a transient error fails the whole
    ``refresh``, which the caller may run again (every write is idempotent:
    a ranking replaces the previous one, the newer generation time wins).

    The per-user store calls of a batch (one feature hydrate, one ranked-feed
    write) run on ``io_threads`` threads: they wait on the network, so their
    round trips overlap instead of adding up. The stores' clients are
    thread-safe (a Redis connection pool, one Cassandra session), so one
    ranker may serve several threads.
    """

    def __init__(self, candidates, features, ranked, models, policy: RankingPolicy,
                 clock: Callable[[], float] = time.time, on_close: Callable[[], None] | None = None,
                 io_threads: int = 8):
        self.candidates = candidates
        self.features = features
        self.ranked = ranked
        self.models = models
        self.policy = policy
        self._clock = clock
        self._on_close = on_close
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="ranking-io")
        #: Scoring calls that failed (the batch was ranked by recency instead).
        self.model_errors = 0

    def close(self) -> None:
        self._io.shutdown(wait=True)
        if self._on_close is not None:
            self._on_close()

    def refresh(self, requests: Sequence[RefreshRequest]) -> list[RefreshOutcome]:
        """Rank and write the feed of every requested user: one outcome per user, in the
        order users first appear (requests of one user are merged, ``merge_requests``)."""
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
