"""The durable (Cassandra) copy of engagement features, and the refill of Redis from it.

``CassandraFeatureStore`` writes the online store's ``FeatureValue``s into the
0001 tables, each cell ``USING TIMESTAMP`` its write stamp, so newer wins as it
does online. ``refill_online`` copies them into an ``OnlineFeatureStore``
(``feedbeam rebuild``), leaving out what the online TTLs would not serve.
Details: docs/architecture.md, "Stores".

    store = CassandraFeatureStore.connect("127.0.0.1", 9042, "feedbeam")
    store.write(values)
    refill_online(store, OnlineFeatureStore.from_url("redis://127.0.0.1:6379/0"))
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

from stores.cassandra.feeds import CassandraFeedStore, batched, to_ms
from schemas import cassandra as cs
from schemas.features import (
    AFFINITY,
    AUTHOR,
    ENTITY_TYPES,
    MAX_VERSION,
    POST,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    FeatureValue,
    is_fresh,
    pair_id,
    split_pair,
)

#: Per entity type: (table, partition column, clustering column or None, value column).
_TABLES = {
    POST: (cs.POST_FEATURES, "post_id", "name", "value"),
    AUTHOR: (cs.AUTHOR_FEATURES, "author_id", "name", "value"),
    VIEWER_AUTHOR: (cs.VIEWER_AUTHOR_AFFINITY, "viewer_id", "author_id", "score"),
    VIEWER_MEDIA: (cs.VIEWER_CONTENT_AFFINITY, "viewer_id", "media_type", "score"),
}


def row_params(v: FeatureValue) -> tuple:
    """The insert's bind values of ``v``: (partition, clustering, value, valid_at, stamp)."""
    if v.entity_type in (POST, AUTHOR):
        return (int(v.entity_id), v.name, float(v.value), v.valid_at_ms, v.write_stamp_us)
    viewer, other = split_pair(v.entity_id)
    if v.entity_type == VIEWER_AUTHOR:
        other = int(other)
    elif v.entity_type != VIEWER_MEDIA:
        raise ValueError(f"unknown entity type {v.entity_type!r}")
    if v.name != AFFINITY:
        raise ValueError(f"{v.entity_type} has only the feature {AFFINITY!r}, not {v.name!r}")
    return (viewer, other, float(v.value), v.valid_at_ms, v.write_stamp_us)


def value_of(entity_type: str, partition: int, clustering, value: float, valid_at,
             writetime_us: int | None) -> FeatureValue:
    """A stored row back as a ``FeatureValue`` (the version from the write time)."""
    version = 0 if writetime_us is None else min(writetime_us % 1000, MAX_VERSION)
    if entity_type in (POST, AUTHOR):
        return FeatureValue(entity_type, str(partition), clustering, value, to_ms(valid_at),
                            version)
    return FeatureValue(entity_type, pair_id(partition, clustering), AFFINITY, value,
                        to_ms(valid_at), version)


class CassandraFeatureStore(CassandraFeedStore):
    """Features in Cassandra (see module doc); ``connect``/``close`` as ``CassandraFeedStore``."""

    def __init__(self, session, keyspace: str, **options):
        super().__init__(session, keyspace, **options)
        ks = self.keyspace
        for entity_type, (table, part, clust, value) in _TABLES.items():
            self._cql[f"put_{entity_type}"] = (
                f"INSERT INTO {ks}.{table} ({part}, {clust}, {value}, valid_at) "
                "VALUES (?, ?, ?, ?) USING TIMESTAMP ?")
            select = (f"SELECT {part}, {clust}, {value}, valid_at, WRITETIME({value}) "
                      f"FROM {ks}.{table}")
            self._cql[f"get_{entity_type}"] = f"{select} WHERE {part} = ?"
            self._cql[f"scan_{entity_type}"] = select

    def write(self, values: Sequence[FeatureValue]) -> int:
        """Upsert ``values`` (newer write stamp wins per cell); returns how many were sent.

        Only the winner of each (entity, name) among ``values`` is sent: the table
        keeps the latest value only, and a batch of a bounded re-run holds many
        window ends of one entity. The rows go in unlogged batches of
        ``batch_rows``, executed concurrently (``CassandraFeedStore._write``): each
        row carries its own ``USING TIMESTAMP``, so a batch needs no atomicity.
        """
        newest: dict[tuple[str, str, str], FeatureValue] = {}
        for v in values:
            key = (v.entity_type, v.entity_id, v.name)
            held = newest.get(key)
            if held is None or (v.write_stamp_us, v.value) > (held.write_stamp_us, held.value):
                newest[key] = v
        # Rows of one partition (a post's or author's names, a viewer's pairs) side by
        # side, so most unlogged batches stay within a partition.
        rows = sorted(newest.values(), key=lambda v: (v.entity_type, v.entity_id))
        self._write([(self._stmt(f"put_{v.entity_type}"), row_params(v)) for v in rows])
        return len(rows)

    def read(self, entity_type: str, partitions: Sequence[int]) -> list[list[FeatureValue]]:
        """Every stored value of each partition (a post, an author, or a viewer's pairs)."""
        results = self._execute_many(f"get_{entity_type}", ((p,) for p in partitions))
        return [[value_of(entity_type, *row) for row in rs] for rs in results]

    def scan(self, entity_type: str, page_size: int = 5000) -> Iterator[FeatureValue]:
        """Every stored value of ``entity_type`` (a full table scan, paged)."""
        for row in self.scan_rows(self._cql[f"scan_{entity_type}"], page_size):
            yield value_of(entity_type, *row)


def refill_online(durable: CassandraFeatureStore, online, entity_types: Iterable[str] = ENTITY_TYPES,
                  batch_size: int = 2000, now_ms: int | None = None,
                  on_batch: Callable[[str, list[FeatureValue]], None] | None = None
                  ) -> dict[str, int]:
    """Copy the durable features into ``online`` (an ``OnlineFeatureStore``), newer-wins.

    ``now_ms``: leave out the values ``online`` would already read as expired
    then (``valid_at`` older than its entity type's TTL, ``online_fresh``):
    Cassandra keeps them longer (its table TTLs), Redis readers never serve
    them. ``on_batch(entity_type, batch)`` is called after each batch of
    ``batch_size`` values read (expired ones included) is written: progress,
    and views derived from the same values (the rebuild's top followers).

    Returns per entity type how many values were read (``read.<type>``),
    left out as expired (``expired.<type>``) and written (``written.<type>``:
    the rest were older than what Redis held).
    """
    counts: dict[str, int] = {}
    for entity_type in entity_types:
        ttl_ms = online.ttls.of(entity_type)
        read = expired = written = 0
        for batch in batched(durable.scan(entity_type), batch_size):
            fresh = batch if now_ms is None else online_fresh(batch, now_ms, ttl_ms)
            expired += len(batch) - len(fresh)
            if fresh:
                written += online.write(fresh)
            read += len(batch)
            if on_batch is not None:
                on_batch(entity_type, batch)
        counts[f"read.{entity_type}"] = read
        counts[f"expired.{entity_type}"] = expired
        counts[f"written.{entity_type}"] = written
    return counts


def online_fresh(values: Sequence[FeatureValue], now_ms: int, ttl_ms: int) -> list[FeatureValue]:
    """The values an online read at ``now_ms`` would still serve (``is_fresh``)."""
    return [v for v in values if is_fresh(v.valid_at_ms, now_ms, ttl_ms)]


__all__ = ["CassandraFeatureStore", "refill_online", "online_fresh", "row_params", "value_of"]
