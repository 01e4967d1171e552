"""``feedbeam migrate``: create or update the Cassandra keyspace.

    feedbeam migrate [--keyspace feedbeam] [--replication-factor 1]

Applies the numbered files of ``schemas/cql/`` not yet recorded in the
keyspace's ``schema_migrations`` table; re-running is a no-op. See
``schemas.cassandra`` for the rules.
"""
from __future__ import annotations

from infra.settings import StackSettings
from infra.errors import UserFacingError
from schemas import cassandra as cql
from stores.cassandra import session as cassandra_session


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "migrate", help="create or update the Cassandra keyspace and tables",
        description="Apply the CQL migrations in schemas/cql/ that the keyspace has not seen.")
    parser.add_argument("--keyspace", default=cql.DEFAULT_KEYSPACE,
                        help="keyspace to migrate (default: %(default)s)")
    parser.add_argument("--replication-factor", type=int, default=1,
                        help="replication factor if the keyspace is created (default: %(default)s)")
    parser.set_defaults(handler=handle)


def handle(args, settings: StackSettings) -> int:
    from cassandra.cluster import NoHostAvailable

    try:
        cql.check_keyspace_name(args.keyspace)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    if args.replication_factor < 1:
        raise UserFacingError("--replication-factor must be at least 1")
    cluster = cassandra_session.new_cluster(settings.host, settings.cassandra_port)
    try:
        try:
            session = cluster.connect()
        except NoHostAvailable as exc:
            raise UserFacingError(
                f"Cassandra at {settings.host}:{settings.cassandra_port} does not answer "
                f"({exc}); start it with `feedbeam infra up`") from exc
        try:
            results = cassandra_session.migrate(session, args.keyspace, args.replication_factor)
        except cql.MigrationError as exc:
            raise UserFacingError(str(exc)) from exc
    finally:
        cluster.shutdown()
    for r in results:
        print(f"{r.version:04d}_{r.name}: {r.status.replace('_', ' ')}")
    applied = sum(r.status == "applied" for r in results)
    print(f"keyspace {args.keyspace}: {applied} applied, {len(results) - applied} already applied")
    return 0
