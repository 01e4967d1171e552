"""The online (Redis) copy of engagement features, for the features pipeline, ranking and serving.

``OnlineFeatureStore`` is the one place that reads and writes the feature keys
of ``schemas.keys.KeyLayout``, one key per entity: a post's or an author's
features one string of a slot per feature name (``stores.redis.slots``), a
viewer's author affinities one string of records sorted by author
(``stores.redis.affinities``), its media affinities a hash of
``"<value>@<write stamp us>"`` fields. Each value carries its write stamp.
Writes are newer-wins per value and refresh a TTL per entity type; reads drop
values older than that TTL and decay affinities to ``now_ms``; each call is one
round trip. Layout and rules: docs/architecture.md, "Stores".

    store = OnlineFeatureStore.from_url("redis://127.0.0.1:6379/0")
    store.write([FeatureValue("post", "101", "like_1h", 3.0, valid_at_ms=1_700_000_000_000)])
    store.hydrate(viewer_id=7, post_ids=[101], author_ids=[45], now_ms=1_700_000_060_000)
"""
from __future__ import annotations

import io
from itertools import chain
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

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
    decay,
    split_pair,
)
from schemas.keys import KeyLayout
from schemas.ranking import BatchFeatures
from stores.redis.multiread import HashReads

#: Keys per write round trip.
DEFAULT_CHUNK = 500

# KEYS[1] a feature hash. ARGV[1] key TTL in ms, then (field, value, stamp) triples.
# Writes a field only when its stamp is later than the stored one (or equal with
# a greater value); returns how many fields were written.
_WRITE_NEWER = """
local applied = 0
for i = 2, #ARGV, 3 do
  local stamp = tonumber(ARGV[i + 2])
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local write = true
  if stored then
    local at = string.find(stored, '@', 1, true)
    local stored_stamp = tonumber(string.sub(stored, at + 1))
    if stored_stamp > stamp then
      write = false
    elseif stored_stamp == stamp
        and tonumber(string.sub(stored, 1, at - 1)) >= tonumber(ARGV[i + 1]) then
      write = false
    end
  end
  if write then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '@' .. ARGV[i + 2])
    applied = applied + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return applied
"""


# -- pure helpers (unit tested without Redis) ------------------------------------------


def decode(raw: bytes | str) -> tuple[float, int]:
    """``(value, valid_at_ms)`` of a stored field."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    value, _, stamp = text.partition("@")
    return float(value), int(stamp) // 1000


# Field names as str, decoded once (a few dozen names and ids recur in every read).
_NAMES: dict[bytes, str] = {}


def _name(field: bytes | str) -> str:
    if not isinstance(field, bytes):
        return field
    name = _NAMES.get(field)
    if name is None:
        name = field.decode()
        if len(_NAMES) < 100_000:
            _NAMES[field] = name
    return name


def fresh_fields(raw: Mapping[bytes | str, bytes | str], now_ms: int, ttl_ms: int,
                 half_life_ms: int | None = None) -> dict[str, float]:
    """The fields of a hash still readable at ``now_ms`` (decayed to it when a half-life is given).

    The hot path of every candidate read: bytes are split and parsed as they
    come (``float``/``int`` take ASCII bytes), stamps compared in microseconds.
    """
    out: dict[str, float] = {}
    oldest_us = (now_ms - ttl_ms) * 1000
    for field, stored in raw.items():
        if not isinstance(stored, bytes):
            stored = stored.encode()
        value, _, stamp = stored.partition(b"@")
        stamp_us = int(stamp)
        if stamp_us < oldest_us:
            continue
        number = float(value)
        if half_life_ms is not None:
            number = decay(number, stamp_us // 1000, now_ms, half_life_ms)
        out[_name(field)] = number
    return out


def _unique(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ids))


#: ``parse_stamped``'s reading of ``value@stamp`` lines: two columns, no quoting, no
#: null spellings (a stored "nan" is a float NaN).
_STAMPED_READ = pa_csv.ReadOptions(column_names=["value", "stamp"], use_threads=False)
_STAMPED_PARSE = pa_csv.ParseOptions(delimiter="@", quote_char=False)
_STAMPED_TYPES = pa_csv.ConvertOptions(column_types={"value": pa.float64(), "stamp": pa.int64()},
                                       null_values=[], strings_can_be_null=False)


def parse_stamped(raw: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid_at_ms)`` of stored fields ``b"<value>@<stamp us>"``, parsed in
    one pass over all of them (the batched reads' hot path): the fields joined as
    lines and read by Arrow's CSV reader, 3-4 times faster than NumPy's conversion of
    the split strings (``bench/probe_hash_reads.py``)."""
    if not raw:
        return np.zeros(0), np.zeros(0, np.int64)
    try:
        table = pa_csv.read_csv(io.BytesIO(b"\n".join(raw)), read_options=_STAMPED_READ,
                                parse_options=_STAMPED_PARSE, convert_options=_STAMPED_TYPES)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"stored feature values are not all '<value>@<stamp>': {exc}") from None
    return (table.column(0).to_numpy().astype(np.float64, copy=False),
            table.column(1).to_numpy() // 1000)


#: Stands in for an absent field: a stamp no TTL reaches, so it reads as missing.
_ABSENT = b"0@-9000000000000000000"


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
        self._write_newer = client.register_script(_WRITE_NEWER)
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
                    records = affinities.pack([int(a) for a in fields],
                                              [value for _, value in fields.values()], stamps)
                    self._merge_affinities(
                        keys=[key], client=pipe,
                        args=[ttl_ms, records, max(stamps) - affinity_ttl_us,
                              affinities.PRUNE_AT])
                    continue
                names = _SLOT_NAMES.get(entity_type)
                if names is not None:  # one string of a slot per feature name
                    self._merge_slots(keys=[key], client=pipe, args=slots.merge_args(
                        names, ttl_ms, {f: (value, stamp) for f, (stamp, value) in fields.items()}))
                    continue
                args: list = [ttl_ms]
                for field, (stamp, value) in fields.items():
                    args += (field, repr(value), stamp)  # repr round-trips a float exactly
                self._write_newer(keys=[key], args=args, client=pipe)
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
            pipe.hgetall(k.content_affinity(viewer_id))
        replies: Iterable = iter(pipe.execute() if len(pipe) else ())
        post_map = dict(zip(posts, _slot_dicts(POST_FEATURES, [next(replies) for _ in posts],
                                               now_ms, ttl.post_ms)))
        author_map = (dict(zip(authors, _slot_dicts(AUTHOR_FEATURES,
                                                    [next(replies) for _ in authors],
                                                    now_ms, ttl.author_ms)))
                      if author_features else {})
        affinity_map: dict[int, float] = {}
        content: dict[str, float] = {}
        if with_viewer:
            if authors:
                values, stamps = affinities.lookup([next(replies)], authors,
                                                   range(len(authors)), (0, len(authors)))
                fresh = _fresh(values, stamps // 1000, now_ms, ttl.viewer_author_ms, hl, 0.0)
                affinity_map = dict(zip(authors, fresh.tolist()))
            content = fresh_fields(next(replies), now_ms, ttl.viewer_media_ms, hl)
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
              reads.same([k.content_affinity(v) for v in viewers], MEDIA_TYPES))
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
        if entity_type in _SLOT_NAMES:
            return {name: (v, s // 1000) for name, (v, s) in
                    slots.fields(_SLOT_NAMES[entity_type], self.client.get(key)).items()}
        return {f.decode(): decode(v) for f, v in self.client.hgetall(key).items()}



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
            viewer = self._viewer_reads.replies()
            blobs = self._viewer_reads.take_strings(affinity_at)
            post_blobs, author_blobs = ([], []) if entity is None else (
                entity.take_strings(self._entity_at[0]), entity.take_strings(self._entity_at[1]))
        finally:
            self.close()
        posts = _fresh(*_slot_arrays(POST_FEATURES, post_blobs), now, ttl.post_ms, None, np.nan)
        authors = _fresh(*_slot_arrays(AUTHOR_FEATURES, author_blobs), now, ttl.author_ms, None,
                         np.nan)
        content, = _parsed([viewer[content_at]], now, (ttl.viewer_media_ms,), (hl,), (0.0,))
        # Each record made fresh and decayed once, then gathered per pair (0.0: none).
        records, at = affinities.locate(blobs, *self._wanted)
        fresh = _fresh(records["value"].astype(np.float64), records["stamp"] // 1000, now,
                       ttl.viewer_author_ms, hl, 0.0)
        affinity = np.append(fresh, 0.0)[at]
        return BatchFeatures(posts.reshape(-1, len(POST_FEATURES)),
                             authors.reshape(-1, len(AUTHOR_FEATURES)), affinity,
                             content.reshape(-1, len(MEDIA_TYPES)))


#: The entity types held as a string of slots (``stores.redis.slots``), by their names.
_SLOT_NAMES = {POST: POST_FEATURES, AUTHOR: AUTHOR_FEATURES}


def _slot_arrays(names, blobs) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid_at_ms)`` of slot strings, each ``(len(blobs), len(names))``."""
    values, stamps = slots.unpack(blobs, len(names))
    return values, stamps // 1000


def _slot_dicts(names, blobs, now_ms: int, ttl_ms: int) -> list[dict[str, float]]:
    """A ``{name: value}`` of the fresh slots of each string (a stored NaN included)."""
    values, valid_at = _slot_arrays(names, blobs)
    fresh = (valid_at >= now_ms - ttl_ms).tolist()
    return [{n: v for n, v, keep in zip(names, row, ok) if keep}
            for row, ok in zip(values.tolist(), fresh)]


def _parsed(groups, now_ms: int, ttl_ms, half_life_ms, missing) -> list[np.ndarray]:
    """The values of groups of HMGET replies, parsed in one pass, an array per group:
    fresh ones (decayed when the group's half-life is not None), the group's
    ``missing`` for absent or expired ones; ``ttl_ms``, ``half_life_ms`` and
    ``missing`` have one entry per group."""
    flat = [[v or _ABSENT for v in chain.from_iterable(g)] for g in groups]
    values, valid_at = parse_stamped(list(chain.from_iterable(flat)))
    out, start = [], 0
    for some, ttl, half_life, absent in zip(flat, ttl_ms, half_life_ms, missing):
        end = start + len(some)
        out.append(_fresh(values[start:end], valid_at[start:end], now_ms, ttl, half_life,
                          absent))
        start = end
    return out

__all__ = ["OnlineFeatureStore", "PendingFeatures", "CandidateFeatures", "decode", "fresh_fields",
           "parse_stamped", "DEFAULT_CHUNK"]
