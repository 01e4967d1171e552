"""``feedbeam migrate``: create or update the Cassandra keyspace.

    feedbeam migrate [--keyspace feedbeam] [--replication-factor 1]   # 2 with FEEDBEAM_TOPOLOGY=cluster

Applies the numbered files of ``schemas/cql/`` not yet recorded in the
keyspace's ``schema_migrations`` table; re-running is a no-op. See
``schemas.cassandra`` for the rules.
"""
from __future__ import annotations

from infra.settings import CLUSTER_CASSANDRA_NODES, StackSettings
from infra.errors import UserFacingError
from schemas import cassandra as cql
from stores.cassandra import session as cassandra_session


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "migrate", help="create or update the Cassandra keyspace and tables",
        description="Apply the CQL migrations in schemas/cql/ that the keyspace has not seen.")
    parser.add_argument("--keyspace", default=cql.DEFAULT_KEYSPACE,
                        help="keyspace to migrate (default: %(default)s)")
    parser.add_argument("--replication-factor", type=int, default=None,
                        help="replication factor if the keyspace is created (default: 1; "
                             f"{CLUSTER_CASSANDRA_NODES}, every node, on the cluster topology)")
    parser.set_defaults(handler=handle)


def handle(args, settings: StackSettings) -> int:
    from cassandra.cluster import NoHostAvailable

    try:
        cql.check_keyspace_name(args.keyspace)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    factor = args.replication_factor
    if factor is None:
        factor = CLUSTER_CASSANDRA_NODES if settings.clustered else 1
    if factor < 1:
        raise UserFacingError("--replication-factor must be at least 1")
    cluster = cassandra_session.new_cluster(settings.cassandra_host, settings.cassandra_port)
    try:
        try:
            session = cluster.connect()
        except NoHostAvailable as exc:
            raise UserFacingError(
                f"Cassandra at {settings.cassandra_host}:{settings.cassandra_port} does not answer "
                f"({exc}); start it with `feedbeam infra up`") from exc
        try:
            results = cassandra_session.migrate(session, args.keyspace, factor)
        except cql.MigrationError as exc:
            raise UserFacingError(str(exc)) from exc
    finally:
        cluster.shutdown()
    for r in results:
        print(f"{r.version:04d}_{r.name}: {r.status.replace('_', ' ')}")
    applied = sum(r.status == "applied" for r in results)
    print(f"keyspace {args.keyspace}: {applied} applied, {len(results) - applied} already applied")
    return 0
