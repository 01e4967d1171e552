"""The online (Redis) copy of engagement features, for the features pipeline, ranking and serving.

``OnlineFeatureStore`` is the one place that reads and writes the feature keys
of ``schemas.keys.KeyLayout``, one binary string per entity: a post's or an
author's features, and a viewer's affinity per media type, a slot per name
(``stores.redis.slots``); a viewer's author affinities, records sorted by
author (``stores.redis.affinities``). Each value carries its write stamp.
Writes are newer-wins per value and refresh a TTL per entity type; reads drop
values older than that TTL and decay affinities to ``now_ms``; each call is one
round trip. Layout and rules: docs/architecture.md, "Stores".

    store = OnlineFeatureStore.from_url("redis://127.0.0.1:6379/0")
    store.write([FeatureValue("post", "101", "like_1h", 3.0, valid_at_ms=1_700_000_000_000)])
    store.hydrate(viewer_id=7, post_ids=[101], author_ids=[45], now_ms=1_700_000_060_000)
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from stores.redis import affinities, slots
from stores.redis.client import chunks, new_client
from schemas.features import (
    AUTHOR,
    AUTHOR_FEATURES,
    DEFAULT_HALF_LIFE_MS,
    MEDIA_TYPES,
    POST,
    POST_FEATURES,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    CandidateFeatures,
    FeatureTTLs,
    FeatureValue,
    split_pair,
)
from schemas.keys import KeyLayout
from schemas.ranking import BatchFeatures
from stores.redis.multiread import HashReads

#: Keys per write round trip.
DEFAULT_CHUNK = 500

# -- pure helpers (unit tested without Redis) ------------------------------------------


def _unique(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _fresh(values: np.ndarray, valid_at: np.ndarray, now_ms: int, ttl_ms: int,
           half_life_ms: int | None, missing: float) -> np.ndarray:
    """Parsed ``values``: decayed when a half-life is given, ``missing`` where older
    than ``ttl_ms``."""
    fresh = valid_at >= now_ms - ttl_ms
    if half_life_ms is not None:
        values = _decayed(values, valid_at, now_ms, half_life_ms)
    return np.where(fresh, values, missing)


def _decayed(values: np.ndarray, valid_at: np.ndarray, now_ms: int,
             half_life_ms: int) -> np.ndarray:
    """``schemas.features.decay`` over arrays (never grown: a future valid_at keeps it)."""
    return values * np.exp2(-np.maximum(now_ms - valid_at, 0) / half_life_ms)


class OnlineFeatureStore:
    """Engagement features in Redis (see module doc).

    ``ttls``: read TTL (and key TTL) per entity type; ``half_life_ms``: the
    decay of affinities, the same as the pipeline that wrote them.
    """

    def __init__(self, client, keys: KeyLayout, ttls: FeatureTTLs | None = None,
                 half_life_ms: int = DEFAULT_HALF_LIFE_MS, chunk_size: int = DEFAULT_CHUNK):
        if half_life_ms < 1:
            raise ValueError("half_life_ms must be at least 1")
        self.client = client
        self.keys = keys
        self.ttls = ttls or FeatureTTLs()
        self.half_life_ms = half_life_ms
        self.chunk_size = chunk_size
        self._merge_affinities = client.register_script(affinities.MERGE)
        self._merge_slots = client.register_script(slots.MERGE)

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "fb", ttls: FeatureTTLs | None = None,
                 half_life_ms: int = DEFAULT_HALF_LIFE_MS,
                 chunk_size: int = DEFAULT_CHUNK) -> "OnlineFeatureStore":
        """A store on a new client for ``url`` (retrying dropped connections; writes are
        idempotent)."""
        return cls(new_client(url), KeyLayout(key_prefix), ttls, half_life_ms, chunk_size)

    def close(self) -> None:
        self.client.close()

    def _pipeline(self):
        return self.client.pipeline(transaction=False)

    # -- writes ---------------------------------------------------------------------

    def key_and_field(self, v: FeatureValue) -> tuple[str, str]:
        """Where ``v`` is stored: ``(redis key, hash field)``."""
        k = self.keys
        if v.entity_type == POST:
            return k.post_features(int(v.entity_id)), v.name
        if v.entity_type == AUTHOR:
            return k.author_features(int(v.entity_id)), v.name
        if v.entity_type == VIEWER_AUTHOR:
            viewer, author = split_pair(v.entity_id)
            return k.author_affinity(viewer), author
        if v.entity_type == VIEWER_MEDIA:
            viewer, media = split_pair(v.entity_id)
            return k.content_affinity(viewer), media
        raise ValueError(f"unknown entity type {v.entity_type!r}")

    def write(self, values: Sequence[FeatureValue]) -> int:
        """Store ``values`` newer-wins; returns how many fields were written (older or
        equal ones are skipped). Within ``values`` the order does not matter: only the
        winner of each (entity, name) is sent."""
        by_key: dict[str, tuple[str, dict[str, tuple[int, float]]]] = {}
        for v in values:
            key, field = self.key_and_field(v)
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = (v.entity_type, {})
            candidate = (v.write_stamp_us, float(v.value))
            held = entry[1].get(field)
            if held is None or candidate > held:
                entry[1][field] = candidate
        written = 0
        affinity_ttl_us = self.ttls.viewer_author_ms * 1000
        for chunk in chunks(list(by_key.items()), self.chunk_size):
            pipe = self._pipeline()
            for key, (entity_type, fields) in chunk:
                ttl_ms = self.ttls.of(entity_type)
                if entity_type == VIEWER_AUTHOR:  # one string of records per viewer
                    stamps = [stamp for stamp, _ in fields.values()]
                    records = affinities.pack(list(fields),
                                              [value for _, value in fields.values()], stamps)
                    self._merge_affinities(
                        keys=[key], client=pipe,
                        args=[ttl_ms, records, max(stamps) - affinity_ttl_us,
                              affinities.PRUNE_AT])
                    continue
                # The others: one string of a slot per feature name (or media type).
                self._merge_slots(keys=[key], client=pipe, args=slots.merge_args(
                    _SLOT_NAMES[entity_type], ttl_ms,
                    {f: (value, stamp) for f, (stamp, value) in fields.items()}))
            written += sum(pipe.execute())
        return written

    # -- reads ----------------------------------------------------------------------

    def post_features(self, post_ids: Sequence[int], now_ms: int) -> list[dict[str, float]]:
        """Feature dict per post id (fresh values only; ``{}`` when none), one round trip."""
        return self.hydrate(None, post_ids, (), now_ms).posts

    def author_features(self, author_ids: Sequence[int], now_ms: int) -> list[dict[str, float]]:
        """Feature dict per author id (fresh values only; ``{}`` when none), one round trip."""
        return self.hydrate(None, (), author_ids, now_ms).authors

    def author_affinity(self, viewer_id: int, author_ids: Sequence[int],
                        now_ms: int) -> list[float]:
        """Affinity of ``viewer_id`` to each author, decayed to ``now_ms`` (0.0 when absent
        or older than the TTL), one HMGET."""
        if not author_ids:
            return []
        return self.hydrate(viewer_id, (), author_ids, now_ms, author_features=False).author_affinity

    def content_affinity(self, viewer_id: int, now_ms: int) -> dict[str, float]:
        """Affinity of ``viewer_id`` per media type, decayed to ``now_ms`` (fresh ones only)."""
        return self.hydrate(viewer_id, (), (), now_ms).content_affinity

    def hydrate(self, viewer_id: int | None, post_ids: Sequence[int], author_ids: Sequence[int],
                now_ms: int, author_features: bool = True) -> CandidateFeatures:
        """Post features, author features, the viewer's author affinities and content
        affinity, all in ONE round trip (repeated ids are fetched once).

        ``author_ids`` need not be aligned with ``post_ids`` (pass the candidates'
        authors, repeated or not); the result lists follow the given orders.
        ``viewer_id=None`` skips the viewer's keys (affinities are then 0.0 / ``{}``).
        """
        k, ttl, hl = self.keys, self.ttls, self.half_life_ms
        posts, authors = _unique(post_ids), _unique(author_ids)
        pipe = self._pipeline()
        for pid in posts:
            pipe.get(k.post_features(pid))
        if author_features:
            for aid in authors:
                pipe.get(k.author_features(aid))
        with_viewer = viewer_id is not None
        if with_viewer:
            if authors:
                pipe.get(k.author_affinity(viewer_id))
            pipe.get(k.content_affinity(viewer_id))
        replies: Iterable = iter(pipe.execute() if len(pipe) else ())
        post_map = dict(zip(posts, _slot_dicts(POST_FEATURES, [next(replies) for _ in posts],
                                               now_ms, ttl.post_ms, None)))
        author_map = (dict(zip(authors, _slot_dicts(AUTHOR_FEATURES,
                                                    [next(replies) for _ in authors],
                                                    now_ms, ttl.author_ms, None)))
                      if author_features else {})
        affinity_map: dict[int, float] = {}
        content: dict[str, float] = {}
        if with_viewer:
            if authors:
                fresh = _fresh_affinities([next(replies)], (authors, range(len(authors)),
                                                            (0, len(authors))),
                                          now_ms, ttl.viewer_author_ms, hl)
                affinity_map = dict(zip(authors, fresh.tolist()))
            content, = _slot_dicts(MEDIA_TYPES, [next(replies)], now_ms, ttl.viewer_media_ms, hl)
        return CandidateFeatures(
            posts=[dict(post_map[pid]) for pid in post_ids],
            authors=[dict(author_map.get(aid, {})) for aid in author_ids],
            author_affinity=[affinity_map.get(aid, 0.0) for aid in author_ids],
            content_affinity=content,
        )

    def hydrate_batch(self, post_ids: Sequence[int], author_ids: Sequence[int],
                      viewers: Sequence[int], viewer_authors: Sequence[Sequence[int]],
                      now_ms: int) -> BatchFeatures:
        """The features of a whole refresh batch in ONE round trip, as arrays
        (``BatchFeatures``): post features of ``post_ids``, author features of
        ``author_ids``, and for each viewer its affinity to each of its
        ``viewer_authors`` (flattened in order) and to each media type.

        The same values as ``hydrate`` (fresh only, affinities decayed to
        ``now_ms``), read as plain HMGETs and GETs written at once
        (``HashReads``) and parsed for all of them at once. ``post_ids`` and
        ``author_ids`` are expected unique. ``send_viewers`` is the same in
        parts, for a caller that works while Redis reads.
        """
        names = list(dict.fromkeys(a for some in viewer_authors for a in some))
        at = {a: j for j, a in enumerate(names)}
        index = [at[a] for some in viewer_authors for a in some]
        bounds = np.cumsum([0, *map(len, viewer_authors)]).tolist()
        with self.send_viewers(viewers, names, index, bounds, now_ms) as pending:
            pending.send_entities(post_ids, author_ids)
            return pending.result()

    def send_viewers(self, viewers: Sequence[int], authors: Sequence[int], index: Sequence[int],
                     bounds: Sequence[int], now_ms: int) -> "PendingFeatures":
        """The viewers' half of ``hydrate_batch`` written to Redis now: each viewer's
        media affinities (an HMGET) and its author affinities (its string of
        records: one MGET for the batch). ``result()`` gives viewer ``i``'s
        affinity to ``authors[j]`` for each ``j`` in ``index[bounds[i]:bounds[i +
        1]]`` (repeats allowed; sorted distinct ``authors`` spare a
        ``np.unique``). Add the posts' and authors' half with ``send_entities``;
        ``result()`` reads and parses both. Close what it returns (or use it as
        a context manager) if ``result()`` is never called."""
        k = self.keys
        reads = HashReads(self.client)
        at = (reads.strings([k.author_affinity(v) for v in viewers]),
              reads.strings([k.content_affinity(v) for v in viewers]))
        reads.send()
        return PendingFeatures(self, reads, at, now_ms, (authors, index, bounds))

    # -- tests and tools ------------------------------------------------------------

    def raw(self, entity_type: str, entity_id: str) -> dict[str, tuple[float, int]]:
        """What is stored for one entity (every field, ignoring TTLs): ``{field: (value,
        valid_at_ms)}``. Pair entities return their viewer's whole hash."""
        key, _ = self.key_and_field(FeatureValue(entity_type, entity_id, "", 0.0, 0))
        if entity_type == VIEWER_AUTHOR:
            authors, values, stamps = affinities.unpack(self.client.get(key))
            return {str(a): (v, s // 1000)
                    for a, v, s in zip(authors.tolist(), values.tolist(), stamps.tolist())}
        return {name: (v, s // 1000) for name, (v, s) in
                slots.fields(_SLOT_NAMES[entity_type], self.client.get(key)).items()}



class PendingFeatures:
    """A batch's feature reads in flight (``OnlineFeatureStore.send_viewers``): the
    viewers' reads, then the posts' and authors' (``send_entities``) on a second
    connection, so they can be sent once the caller knows which it lacks."""

    def __init__(self, store: OnlineFeatureStore, viewer_reads: HashReads,
                 at: tuple[slice, slice], now_ms: int, wanted: tuple):
        self._store, self._now_ms, self._wanted = store, now_ms, wanted
        self._viewer_reads, self._viewer_at = viewer_reads, at
        self._entity_reads: HashReads | None = None
        self._entity_at = (slice(0, 0), slice(0, 0))

    def __enter__(self) -> "PendingFeatures":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._viewer_reads.close()
        if self._entity_reads is not None:
            self._entity_reads.close()

    def send_entities(self, post_ids: Sequence[int], author_ids: Sequence[int]) -> None:
        """Write the reads of the features of ``post_ids`` and ``author_ids`` (once)."""
        if self._entity_reads is not None:
            raise RuntimeError("PendingFeatures.send_entities: already sent")
        k = self._store.keys
        self._entity_reads = reads = HashReads(self._store.client)
        self._entity_at = (reads.strings([k.post_features(p) for p in post_ids]),
                           reads.strings([k.author_features(a) for a in author_ids]))
        reads.send()

    def result(self) -> BatchFeatures:
        """The replies of both halves, parsed into ``BatchFeatures`` (see
        ``hydrate_batch``): every value of the batch in one parse."""
        store, now = self._store, self._now_ms
        ttl, hl = store.ttls, store.half_life_ms
        affinity_at, content_at = self._viewer_at
        entity = self._entity_reads
        try:
            blobs = self._viewer_reads.take_strings(affinity_at)
            media = self._viewer_reads.take_strings(content_at)
            post_blobs, author_blobs = ([], []) if entity is None else (
                entity.take_strings(self._entity_at[0]), entity.take_strings(self._entity_at[1]))
        finally:
            self.close()
        posts = _fresh(*_slot_arrays(POST_FEATURES, post_blobs), now, ttl.post_ms, None, np.nan)
        authors = _fresh(*_slot_arrays(AUTHOR_FEATURES, author_blobs), now, ttl.author_ms, None,
                         np.nan)
        content = _fresh(*_slot_arrays(MEDIA_TYPES, media), now, ttl.viewer_media_ms, hl, 0.0)
        affinity = _fresh_affinities(blobs, self._wanted, now, ttl.viewer_author_ms, hl)
        return BatchFeatures(posts.reshape(-1, len(POST_FEATURES)),
                             authors.reshape(-1, len(AUTHOR_FEATURES)), affinity,
                             content.reshape(-1, len(MEDIA_TYPES)))


def _fresh_affinities(blobs: Sequence[bytes | None], wanted, now_ms: int, ttl_ms: int,
                      half_life_ms: int | None) -> np.ndarray:
    """The author affinities of the pairs ``wanted`` (``affinities.locate``'s
    ``(authors, index, bounds)`` over the viewers' strings ``blobs``), fresh and
    decayed, 0.0 where a viewer has none: each record made fresh once, then
    gathered per pair."""
    records, at = affinities.locate(blobs, *wanted)
    fresh = _fresh(records["value"].astype(np.float64), records["stamp"] // 1000, now_ms,
                   ttl_ms, half_life_ms, 0.0)
    return np.append(fresh, 0.0)[at]


#: The entity types held as a string of slots (``stores.redis.slots``), by their names.
_SLOT_NAMES = {POST: POST_FEATURES, AUTHOR: AUTHOR_FEATURES, VIEWER_MEDIA: MEDIA_TYPES}


def _slot_arrays(names, blobs) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid_at_ms)`` of slot strings, each ``(len(blobs), len(names))``."""
    values, stamps = slots.unpack(blobs, len(names))
    return values, stamps // 1000


def _slot_dicts(names, blobs, now_ms: int, ttl_ms: int,
                half_life_ms: int | None) -> list[dict[str, float]]:
    """A ``{name: value}`` of the fresh slots of each string (a stored NaN included),
    decayed to ``now_ms`` when a half-life is given."""
    values, valid_at = _slot_arrays(names, blobs)
    fresh = (valid_at >= now_ms - ttl_ms).tolist()
    if half_life_ms is not None:
        values = _decayed(values, valid_at, now_ms, half_life_ms)
    return [{n: v for n, v, keep in zip(names, row, ok) if keep}
            for row, ok in zip(values.tolist(), fresh)]


__all__ = ["OnlineFeatureStore", "PendingFeatures", "CandidateFeatures", "DEFAULT_CHUNK"]
