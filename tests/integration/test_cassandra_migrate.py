"""Migrations against the real Cassandra: applied once, then a no-op; edits are refused."""
from __future__ import annotations

import dataclasses

import pytest

from schemas import cassandra as cql
from stores.cassandra import session as cassandra_db

pytestmark = pytest.mark.integration


def _tables(session, keyspace: str) -> set[str]:
    rows = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,))
    return {r.table_name for r in rows}


def test_migrate_twice_then_changed_file(cassandra_session, keyspace):
    first = cassandra_db.migrate(cassandra_session, keyspace)
    assert first and all(r.status == "applied" for r in first)
    assert _tables(cassandra_session, keyspace) == set(cql.TABLES) | {cql.MIGRATIONS_TABLE}

    recorded = cassandra_db.applied_migrations(cassandra_session, keyspace)
    assert {v: c for v, (_, c) in recorded.items()} == {
        m.version: m.checksum for m in cql.load_migrations()}

    second = cassandra_db.migrate(cassandra_session, keyspace)
    assert [r.status for r in second] == ["already_applied"] * len(first)
    assert cassandra_db.applied_migrations(cassandra_session, keyspace) == recorded

    edited = [dataclasses.replace(m, text=m.text + "\n-- edited\n") if m.version == 1 else m
              for m in cql.load_migrations()]
    with pytest.raises(cql.MigrationError, match="changed after it was applied"):
        cassandra_db.migrate(cassandra_session, keyspace, migrations=edited)


def test_new_migration_is_applied_and_tables_work(cassandra_session, keyspace):
    cassandra_db.migrate(cassandra_session, keyspace)
    extra = cql.Migration(
        version=max(m.version for m in cql.load_migrations()) + 1, name="extra",
        text="CREATE TABLE IF NOT EXISTS extra_table (k int PRIMARY KEY, v text);")
    results = cassandra_db.migrate(cassandra_session, keyspace,
                          migrations=cql.load_migrations() + [extra])
    assert results[-1] == cql.MigrationResult(extra.version, "extra", "applied")
    assert {r.status for r in results[:-1]} == {"already_applied"}
    assert "extra_table" in _tables(cassandra_session, keyspace)

    # The tables work as the comments say: a feed partition reads newest first.
    t0 = 1_700_000_000_000
    bucket = cql.time_bucket(t0)
    insert = cassandra_session.prepare(
        f"INSERT INTO {keyspace}.{cql.HOME_FEED_BY_USER} "
        "(user_id, bucket, created_at, post_id, author_id) VALUES (?, ?, ?, ?, ?) "
        "USING TIMESTAMP ?")
    for i in range(3):
        cassandra_session.execute(insert, (1, bucket, t0 + i, 100 + i, 7,
                                           cql.event_timestamp_us(t0 + i)))
    rows = cassandra_session.execute(
        f"SELECT post_id FROM {keyspace}.{cql.HOME_FEED_BY_USER} "
        "WHERE user_id = %s AND bucket = %s", (1, bucket))
    assert [r.post_id for r in rows] == [102, 101, 100]

    # Out-of-order follow/unfollow: the later event time wins, whatever the arrival order.
    follow = cassandra_session.prepare(
        f"INSERT INTO {keyspace}.{cql.FOLLOWERS_BY_USER} (user_id, follower_id, since) "
        "VALUES (?, ?, ?) USING TIMESTAMP ?")
    unfollow = cassandra_session.prepare(
        f"DELETE FROM {keyspace}.{cql.FOLLOWERS_BY_USER} USING TIMESTAMP ? "
        "WHERE user_id = ? AND follower_id = ?")
    cassandra_session.execute(follow, (7, 1, t0 + 20, cql.event_timestamp_us(t0 + 20)))
    cassandra_session.execute(unfollow, (cql.event_timestamp_us(t0 + 10), 7, 1))  # older, late
    cassandra_session.execute(unfollow, (cql.event_timestamp_us(t0 + 30), 7, 2))
    cassandra_session.execute(follow, (7, 2, t0 + 25, cql.event_timestamp_us(t0 + 25)))  # older, late
    rows = cassandra_session.execute(
        f"SELECT follower_id FROM {keyspace}.{cql.FOLLOWERS_BY_USER} WHERE user_id = 7")
    assert [r.follower_id for r in rows] == [1]


def test_cli_migrate(keyspace, stack, capsys):
    from jobs.cli import main

    assert main(["migrate", "--keyspace", keyspace]) == 0
    assert "0001_init: applied" in capsys.readouterr().out
    assert main(["migrate", "--keyspace", keyspace]) == 0
    assert "0001_init: already applied" in capsys.readouterr().out
