"""Unlogged batches bounded by bytes as well as statements (``pack_batches``), and the
consistency levels a keyspace's replication implies (``consistency_level``)."""
from __future__ import annotations

import pytest
from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement

from stores.cassandra.feeds import MAX_BATCH_BYTES, pack_batches, param_bytes
from stores.cassandra.session import consistency_level

ROW = "INSERT %s %s %s"


def _sizes(packed) -> list:
    return [len(s._statements_and_parameters) if isinstance(s, BatchStatement) else 1
            for s, _ in packed]


def test_a_huge_row_is_sent_alone_and_its_neighbours_still_batch():
    hashtags = tuple(("h%03d" % i) * 25 for i in range(600))  # the 61 KB post of issue 25
    work = [(ROW, (i, "PHOTO", ())) for i in range(10)]
    work.insert(4, (ROW, (99, "PHOTO", hashtags)))
    packed = pack_batches(work, batch_rows=50)
    assert _sizes(packed) == [4, 1, 6]
    assert packed[1] == work[4]  # the lone statement as it was: no batch limit applies
    assert sum(_sizes(packed)) == len(work)


def test_batches_stay_under_the_byte_limit_and_the_row_limit():
    work = [(ROW, (i, "x" * 1000, ())) for i in range(200)]
    packed = pack_batches(work, batch_rows=50, max_batch_bytes=10_000)
    assert sum(_sizes(packed)) == 200
    for stmt, _ in packed:
        if isinstance(stmt, BatchStatement):
            # Rows of ~1 KB: a batch never carries more than the limit's worth.
            assert len(stmt._statements_and_parameters) <= 10_000 // 1000
    small = [(ROW, (i, "y", ())) for i in range(120)]
    assert _sizes(pack_batches(small, batch_rows=50)) == [50, 50, 20]
    assert pack_batches(small, batch_rows=1) == small
    assert MAX_BATCH_BYTES < 50 * 1024  # below Cassandra's default fail threshold


def test_param_bytes_counts_strings_collections_and_scalars():
    assert param_bytes(7) == param_bytes(1.5) == 8
    assert param_bytes(None) == 0
    assert param_bytes("abc") == 3 and param_bytes("ü") == 2
    assert param_bytes(b"\x00" * 5) == 5
    assert param_bytes(("ab", "cd")) > 4  # elements cost more than their bytes
    assert param_bytes({"k": "v"}) > 2


@pytest.mark.parametrize("name, factor, expected", [
    ("auto", 1, ConsistencyLevel.LOCAL_ONE),
    ("auto", None, ConsistencyLevel.LOCAL_ONE),
    ("auto", 3, ConsistencyLevel.LOCAL_QUORUM),
    ("AUTO", 2, ConsistencyLevel.LOCAL_QUORUM),
    ("ONE", 3, ConsistencyLevel.ONE),
    ("local_quorum", 1, ConsistencyLevel.LOCAL_QUORUM),
])
def test_consistency_levels_follow_the_replication_factor_unless_named(name, factor, expected):
    assert consistency_level(name, factor) == expected


def test_unknown_consistency_names_are_refused():
    with pytest.raises(ValueError, match="unknown consistency level"):
        consistency_level("SERIAL", 1)


def _prepared(types, query_id=b"q1"):
    from cassandra.protocol import ColumnMetadata
    from cassandra.query import PreparedStatement

    meta = [ColumnMetadata("ks", "t", f"c{i}", t) for i, t in enumerate(types)]
    return PreparedStatement(meta, query_id, [0], "INSERT ...", "ks", 5, None, None)


def test_int_rows_are_bound_to_the_same_bytes_as_the_driver_binds_them():
    from cassandra.cqltypes import DateType, LongType, UTF8Type
    from cassandra.query import BatchType

    ints = _prepared([LongType, LongType, DateType, LongType])
    text = _prepared([LongType, UTF8Type], b"q2")
    work = [(ints, (7, 3, 1_780_000_000_000, 1_780_000_000_000_000)),
            (ints, (2**63 - 1, -5, 0, True)),
            (ints, (8, None, 1, 2)),            # a null: the driver binds it
            (ints, (9, 1, 1.5e12, 2)),          # a float timestamp: the driver rounds it
            (text, (4, "ab")),
            (ints, (1, 2, 3, 4))]
    (batch, _), = pack_batches(work, batch_rows=50)
    expected = BatchStatement(batch_type=BatchType.UNLOGGED)
    for stmt, params in work:
        expected.add(stmt, params)
    assert batch._statements_and_parameters == expected._statements_and_parameters
    assert batch.routing_key == expected.routing_key and batch.keyspace == "ks"


def test_a_value_the_driver_refuses_fails_with_the_driver_s_error():
    from cassandra.cqltypes import LongType

    ints = _prepared([LongType])
    for bad in (2**63, 1.5, "7"):
        with pytest.raises(TypeError, match="invalid type for column"):
            pack_batches([(ints, (1,)), (ints, (bad,))], batch_rows=50)


def test_more_rows_a_batch_than_the_protocol_carries_are_refused():
    with pytest.raises(ValueError, match="65,535"):
        pack_batches([(ROW, (1, "x", ()))] * 3, batch_rows=70_000)


def test_the_batch_rows_flag_reaches_the_stores_and_a_default_batch_of_graph_rows_is_full():
    from apache_beam.options.pipeline_options import PipelineOptions
    from cassandra.cqltypes import DateType, LongType

    from pipelines.common import StoreOptions
    from stores.config import DEFAULT_CASSANDRA_BATCH_ROWS, StoreConfig

    def config(*flags):
        return PipelineOptions(list(flags)).view_as(StoreOptions).config()

    assert config().cassandra_options["batch_rows"] == DEFAULT_CASSANDRA_BATCH_ROWS
    assert config("--cassandra_batch_rows=1").cassandra_options["batch_rows"] == 1
    for bad in ("0", "65536", "many"):
        with pytest.raises(SystemExit):  # argparse refuses it when the job starts
            config(f"--cassandra_batch_rows={bad}")
    with pytest.raises(ValueError, match="cassandra_batch_rows"):
        StoreConfig(cassandra_batch_rows=0)
    # A follow row (followee, follower, since, write time): the byte bound leaves
    # the default batch whole.
    edge = _prepared([LongType, LongType, DateType, LongType])
    work = [(edge, (i, 7, 1_780_000_000_000, 1_780_000_000_000_000))
            for i in range(2 * DEFAULT_CASSANDRA_BATCH_ROWS + 3)]
    assert _sizes(pack_batches(work, DEFAULT_CASSANDRA_BATCH_ROWS)) == [
        DEFAULT_CASSANDRA_BATCH_ROWS, DEFAULT_CASSANDRA_BATCH_ROWS, 3]
