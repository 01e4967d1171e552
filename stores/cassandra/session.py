"""Connecting to Cassandra, its consistency levels, and bringing a keyspace's schema up to date.

    cluster = new_cluster("127.0.0.1", 9042)
    session = cluster.connect()
    apply_consistency(session, "feedbeam", read="auto", write="auto")
    migrate(session, "feedbeam", replication_factor=1)

Every client (migrations, pipelines, serving, tests) connects through
``new_cluster``. ``apply_consistency`` sets the levels of its execution
profiles (``auto``: LOCAL_QUORUM when the keyspace is replicated, else
LOCAL_ONE; why: docs/operations.md, "Consistency"). ``migrate`` applies the
files of ``schemas/cql`` not yet recorded in ``<keyspace>.schema_migrations``;
running it again is a no-op and an applied file that changed is an error
(``schemas.cassandra`` loads them).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from schemas.cassandra import (
    DDL_TIMEOUT_S,
    DEFAULT_KEYSPACE,
    MIGRATIONS_TABLE,
    Migration,
    MigrationError,
    MigrationResult,
    check_keyspace_name,
    load_migrations,
)

log = logging.getLogger(__name__)

#: The execution profile of statements that read at the read level; every
#: other statement runs on the default profile, at the write level.
READ_PROFILE = "feedbeam-read"
AUTO = "auto"
#: Level names ``--cassandra_*_consistency`` accept (the driver's, less the serial ones).
CONSISTENCY_NAMES = (AUTO, "ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM",
                     "EACH_QUORUM", "LOCAL_ONE")


def consistency_level(name: str, replication_factor: int | None) -> int:
    """The driver's ``ConsistencyLevel`` for ``name``; ``auto`` is LOCAL_QUORUM when
    the keyspace has more than one replica in the local DC, else LOCAL_ONE (also
    when the factor is unknown: a keyspace not created yet)."""
    from cassandra import ConsistencyLevel

    key = name.upper()
    if key == AUTO.upper():
        key = "LOCAL_QUORUM" if (replication_factor or 1) > 1 else "LOCAL_ONE"
    if key.lower() not in (n.lower() for n in CONSISTENCY_NAMES):
        raise ValueError(f"unknown consistency level {name!r}; one of {', '.join(CONSISTENCY_NAMES)}")
    return ConsistencyLevel.name_to_value[key]


def new_cluster(host: str, port: int, **options):
    """A driver ``Cluster`` for one local-DC contact point, token-aware, protocol v5.

    Every client of feedbeam (migrations, pipelines, serving, tests) connects
    through here, so they agree on the protocol and routing. It has two
    execution profiles: the default one and ``READ_PROFILE``, both at the
    driver's default level until ``apply_consistency`` sets them. ``options``
    pass through to ``Cluster`` (e.g. ``connect_timeout``).
    """
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    def profile():
        return ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()))

    return Cluster([host], port=port, protocol_version=5,
                   execution_profiles={EXEC_PROFILE_DEFAULT: profile(), READ_PROFILE: profile()},
                   **options)


def replication_factor(session, keyspace: str) -> int | None:
    """Replicas of ``keyspace`` in the local data center (any DC's for a SimpleStrategy);
    None if the keyspace does not exist (yet)."""
    from cassandra.metadata import NetworkTopologyStrategy, SimpleStrategy

    meta = session.cluster.metadata.keyspaces.get(keyspace)
    if meta is None:
        return None
    strategy = meta.replication_strategy
    if isinstance(strategy, SimpleStrategy):
        return strategy.replication_factor
    if isinstance(strategy, NetworkTopologyStrategy):
        factors = strategy.dc_replication_factors
        return factors.get(_local_datacenter(session), max(factors.values(), default=None))
    return None


def apply_consistency(session, keyspace: str, read: str = AUTO, write: str = AUTO) -> tuple[int, int]:
    """Set the consistency levels of ``session``'s cluster: the default profile (every
    statement that names none: all writes) at ``write``, ``READ_PROFILE`` at
    ``read``; ``auto`` follows ``keyspace``'s replication factor
    (``consistency_level``). Returns the two levels ``(read, write)``."""
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT

    factor = replication_factor(session, keyspace) if AUTO in (read.lower(), write.lower()) else None
    levels = consistency_level(read, factor), consistency_level(write, factor)
    profiles = session.cluster.profile_manager.profiles
    profiles[READ_PROFILE].consistency_level = levels[0]
    profiles[EXEC_PROFILE_DEFAULT].consistency_level = levels[1]
    log.info("cassandra %s: reads at %s, writes at %s (replication factor %s)", keyspace,
             ConsistencyLevel.value_to_name[levels[0]], ConsistencyLevel.value_to_name[levels[1]],
             factor if factor is not None else "not looked up")
    return levels


def read_level(session) -> int | None:
    """The consistency level ``apply_consistency`` gave ``session``'s reads (None: the
    driver's default)."""
    return session.cluster.profile_manager.profiles[READ_PROFILE].consistency_level


def open_on_new_cluster(host: str, port: int, open_store, wait_s: float = 120.0,
                        max_delay_s: float = 15.0, keyspace: str | None = None,
                        read_consistency: str = AUTO, write_consistency: str = AUTO):
    """``open_store(session)`` on a new cluster connection; returns ``(cluster, store)``.

    A pipeline's workers connect in their ``setup()``: a Cassandra that is
    starting, restarting or briefly saturated (connects and prepares time
    out) should delay the job, not fail it. ``NoHostAvailable`` and
    ``OperationTimedOut`` are retried with exponential backoff for up to
    ``wait_s`` seconds (0: one attempt), logging each failure; then, or on any
    other error, the error is raised and the cluster shut down. Given the
    store's ``keyspace``, the cluster's consistency levels are set first
    (``apply_consistency``).
    """
    import time

    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        cluster = new_cluster(host, port)
        try:
            session = cluster.connect()
            if keyspace is not None:
                apply_consistency(session, keyspace, read_consistency, write_consistency)
            return cluster, open_store(session)
        except (NoHostAvailable, OperationTimedOut) as exc:
            cluster.shutdown()
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("cassandra at %s:%d not available (%s: %s); retrying in %.0fs",
                        host, port, type(exc).__name__, exc, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, max_delay_s)
        except BaseException:
            cluster.shutdown()
            raise


def _local_datacenter(session) -> str:
    row = session.execute("SELECT data_center FROM system.local").one()
    return row.data_center


def create_keyspace(session, keyspace: str, replication_factor: int = 1) -> None:
    """Create ``keyspace`` (NetworkTopologyStrategy in the local DC) if it does not exist."""
    check_keyspace_name(keyspace)
    if replication_factor < 1:
        raise ValueError("replication factor must be at least 1")
    dc = _local_datacenter(session)
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        f"{{'class': 'NetworkTopologyStrategy', '{dc}': {replication_factor}}}",
        timeout=DDL_TIMEOUT_S,
    )
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.{MIGRATIONS_TABLE} ("
        "version int PRIMARY KEY, name text, checksum text, applied_at timestamp)",
        timeout=DDL_TIMEOUT_S,
    )


def applied_migrations(session, keyspace: str) -> dict[int, tuple[str, str]]:
    """``version -> (name, checksum)`` recorded in ``keyspace``."""
    check_keyspace_name(keyspace)
    rows = session.execute(
        f"SELECT version, name, checksum FROM {keyspace}.{MIGRATIONS_TABLE}",
        timeout=DDL_TIMEOUT_S,
    )
    return {r.version: (r.name, r.checksum) for r in rows}


def migrate(
    session,
    keyspace: str = DEFAULT_KEYSPACE,
    replication_factor: int = 1,
    migrations: list[Migration] | None = None,
) -> list[MigrationResult]:
    """Bring ``keyspace`` up to date; returns what happened to each migration.

    ``session`` is any connected session; it is not bound to the keyspace (a
    short-lived session of the same cluster is, for the unqualified DDL).
    Raises ``MigrationError`` if an applied file changed.
    """
    migrations = load_migrations() if migrations is None else migrations
    create_keyspace(session, keyspace, replication_factor)
    applied = applied_migrations(session, keyspace)
    # Check everything before changing anything: an edited applied file stops the run.
    for m in migrations:
        if m.version in applied and applied[m.version][1] != m.checksum:
            raise MigrationError(
                f"migration {m.version:04d}_{m.name}.cql changed after it was applied to "
                f"keyspace {keyspace} (checksum {m.checksum[:12]}, recorded "
                f"{applied[m.version][1][:12]}); add a new migration instead of editing it")
    results: list[MigrationResult] = []
    pending = [m for m in migrations if m.version not in applied]
    if not pending:
        return [MigrationResult(m.version, m.name, "already_applied") for m in migrations]
    ks_session = session.cluster.connect(keyspace)
    try:
        for m in migrations:
            if m.version in applied:
                results.append(MigrationResult(m.version, m.name, "already_applied"))
                continue
            log.info("applying %04d_%s to %s", m.version, m.name, keyspace)
            for statement in m.statements:
                ks_session.execute(statement, timeout=DDL_TIMEOUT_S)
            _record(ks_session, keyspace, m)
            results.append(MigrationResult(m.version, m.name, "applied"))
    finally:
        ks_session.shutdown()
    return results


def _record(session, keyspace: str, m: Migration) -> None:
    # LWT: if another runner recorded this version meanwhile, its checksum must match.
    result = session.execute(
        f"INSERT INTO {keyspace}.{MIGRATIONS_TABLE} (version, name, checksum, applied_at) "
        "VALUES (%s, %s, %s, %s) IF NOT EXISTS",
        (m.version, m.name, m.checksum, datetime.now(timezone.utc)),
        timeout=DDL_TIMEOUT_S,
    )
    if not result.was_applied and result.one().checksum != m.checksum:
        raise MigrationError(
            f"migration {m.version:04d} was recorded concurrently with another checksum")
