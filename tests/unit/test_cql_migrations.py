"""Migration files and the statement splitter (no Cassandra needed)."""
from __future__ import annotations

import pytest

from schemas import cassandra as cql


def test_split_respects_quotes_and_comments():
    text = """
    -- a comment; with a semicolon
    CREATE TABLE a (x int PRIMARY KEY) WITH comment = 'it''s; fine';  // trailing; comment
    /* block ; comment */ INSERT INTO a (x) VALUES (1);
    SELECT * FROM a
    """
    assert cql.split_statements(text) == [
        "CREATE TABLE a (x int PRIMARY KEY) WITH comment = 'it''s; fine'",
        "INSERT INTO a (x) VALUES (1)",
        "SELECT * FROM a",
    ]


def test_unterminated_quote_is_an_error():
    with pytest.raises(cql.MigrationError):
        cql.split_statements("SELECT 'oops;")


def test_shipped_migrations_are_numbered_and_idempotent():
    migrations = cql.load_migrations()
    # Numbers are reserved per branch, so a branch may hold 0003 without 0002.
    versions = [m.version for m in migrations]
    assert versions[0] == 1 and versions == sorted(set(versions))
    for m in migrations:
        for statement in m.statements:
            assert "IF NOT EXISTS" in statement.upper() or "IF EXISTS" in statement.upper(), statement
    created = {s.split()[5] for m in migrations for s in m.statements
               if s.upper().startswith("CREATE TABLE")}
    assert created == set(cql.TABLES)


def test_bad_file_names_and_duplicates(tmp_path):
    (tmp_path / "0001_init.cql").write_text("SELECT 1;")
    (tmp_path / "0001_again.cql").write_text("SELECT 2;")
    with pytest.raises(cql.MigrationError, match="two migrations"):
        cql.load_migrations(tmp_path)
    (tmp_path / "0001_again.cql").unlink()
    (tmp_path / "init.cql").write_text("")
    with pytest.raises(cql.MigrationError, match="NNNN_name"):
        cql.load_migrations(tmp_path)


def test_buckets_are_epoch_weeks():
    week = cql.FEED_BUCKET_MS
    assert cql.time_bucket(0) == 0
    assert cql.time_bucket(week - 1) == 0
    assert cql.time_bucket(week) == 1
    assert cql.buckets_back(3 * week + 5, 3) == [3, 2, 1]


@pytest.mark.parametrize("name", ["Feedbeam", "1abc", "a-b", "x" * 49, "ks; DROP"])
def test_bad_keyspace_names(name):
    with pytest.raises(ValueError):
        cql.check_keyspace_name(name)
