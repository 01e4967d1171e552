"""``feedbeam clean``: remove what a run created, and nothing else.

    feedbeam clean --topic-prefix t1. --consumer-group t1-fanout \\
        --redis-key-prefix t1 --cassandra-keyspace t1 [--dry-run]

Removes the Kafka topics whose names start with the prefix (the event topics,
their ``.dlq`` twins, any other topic of the run), the consumer groups named and
those that committed offsets on those topics only, the Redis keys
``<key prefix>:*`` (SCAN and UNLINK in batches) and the keyspace, and prints
what it removed. The production names (no topic prefix, a group
``feedbeam-*``, key prefix ``fb``, keyspace ``feedbeam``) need ``--yes-production``;
a job ``feedbeam status`` lists as running on any of them must be cancelled first.
``clean()`` and the functions it calls are the API tests and benchmarks use.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Iterable

from infra.errors import UserFacingError
from infra.settings import StackSettings
from pipelines.runtime import beam_spelling, flag_value
from schemas.cassandra import check_keyspace_name
from schemas.events import TOPICS, dlq_topics
from schemas.keys import KeyLayout
from stores.config import DEFAULT_KEY_PREFIX, DEFAULT_KEYSPACE

_TIMEOUT_S = 60.0
#: Keys per UNLINK (and the SCAN count hint): one round trip moves this many.
UNLINK_BATCH = 1000


@dataclasses.dataclass
class Cleaned:
    """What ``clean`` removed (or, dry, would remove), and what it did not find."""

    topic_prefix: str | None = None
    topics: list[str] = dataclasses.field(default_factory=list)
    groups: list[str] = dataclasses.field(default_factory=list)
    groups_missing: list[str] = dataclasses.field(default_factory=list)
    groups_kept: list[str] = dataclasses.field(default_factory=list)
    key_pattern: str | None = None
    keys: int | None = None
    keyspace: str | None = None
    keyspace_missing: bool = False

    def lines(self, dry_run: bool = False) -> list[str]:
        verb = "would remove" if dry_run else "removed"
        out = []
        if self.topics:
            out.append(f"topics: {verb} {len(self.topics)}: {', '.join(self.topics)}")
        elif self.topic_prefix is not None:
            out.append(f"topics: none starting with {self.topic_prefix!r}")
        if self.groups or self.groups_missing or self.groups_kept:
            out.append(f"consumer groups: {verb} {', '.join(self.groups) or 'none'}"
                       + (f"; not there: {', '.join(self.groups_missing)}"
                          if self.groups_missing else "")
                       + (f"; kept (default names, see --yes-production): "
                          f"{', '.join(self.groups_kept)}" if self.groups_kept else ""))
        if self.keys is not None:
            out.append(f"redis keys {self.key_pattern}: {verb} {self.keys:,}")
        if self.keyspace is not None:
            out.append(f"keyspace {self.keyspace}: "
                       + ("not there" if self.keyspace_missing else verb))
        return out or ["nothing named to remove"]


# ---------------------------------------------------------------- what is production


def production_names(topic_prefix: str | None, groups: Iterable[str], keyspace: str | None,
                     key_prefix: str | None) -> list[str]:
    """The names among these that the default (production) deployment uses."""
    out = []
    if topic_prefix == "":
        out.append("the unprefixed topics")
    out += [f"group {g}" for g in groups if g.startswith("feedbeam-")]
    if key_prefix == DEFAULT_KEY_PREFIX:
        out.append(f"Redis key prefix {key_prefix}")
    if keyspace == DEFAULT_KEYSPACE:
        out.append(f"keyspace {keyspace}")
    return out


def check_names(keyspace: str | None, key_prefix: str | None) -> str | None:
    """The Redis key pattern of ``key_prefix``; ``UserFacingError`` for a name that
    cannot be a run's (not a plain identifier, or a system keyspace)."""
    try:
        if keyspace is not None and check_keyspace_name(keyspace).startswith("system"):
            raise ValueError(f"{keyspace} is Cassandra's own keyspace")
        return None if key_prefix is None else KeyLayout(key_prefix).pattern()
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None


# ---------------------------------------------------------------- the pieces


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap})


def topics_of(admin, prefix: str) -> list[str]:
    """The topics of a run on ``prefix``: every topic starting with it; for the empty
    prefix only the event topics and the ``.dlq`` topics of the pipelines (not every
    topic there is)."""
    existing = admin.list_topics(timeout=_TIMEOUT_S).topics
    if prefix:
        return sorted(t for t in existing if t.startswith(prefix))
    return sorted(t for t in existing if t in set(TOPICS) | set(dlq_topics()))


def delete_topics(admin, names: list[str], timeout_s: float = _TIMEOUT_S) -> list[str]:
    """Delete ``names`` and wait until the broker no longer lists them (so they can be
    created again at once); returns those that existed."""
    from confluent_kafka import KafkaError, KafkaException

    if not names:
        return []
    deleted = []
    futures = admin.delete_topics(list(names), operation_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 5)
            deleted.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
    deadline = time.monotonic() + timeout_s
    while set(deleted) & set(admin.list_topics(timeout=timeout_s).topics):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics still listed {timeout_s:.0f}s after their deletion")
        time.sleep(0.2)
    return sorted(deleted)


def committed_topics(admin, groups: Iterable[str],
                     timeout_s: float = _TIMEOUT_S) -> dict[str, set[str]]:
    """The topics each of ``groups`` has committed offsets on (asked all at once)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException

    futures = {g: admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(g)],
                                                    request_timeout=timeout_s)[g]
               for g in groups}
    out = {}
    for group, future in futures.items():
        try:
            found = future.result(timeout=timeout_s + 5).topic_partitions or []
        except KafkaException:
            found = []  # a group that does not exist (any more)
        out[group] = {tp.topic for tp in found if tp.offset >= 0}
    return out


def groups_only_on(admin, topics: Iterable[str], timeout_s: float = _TIMEOUT_S) -> list[str]:
    """The consumer groups whose committed offsets all lie on ``topics`` (a run's groups:
    nothing outside the run reads as them)."""
    topics = set(topics)
    if not topics:
        return []
    listing = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    found = committed_topics(admin, sorted(g.group_id for g in listing.valid), timeout_s)
    return [g for g, on in found.items() if on and on <= topics]


def delete_groups(admin, groups: list[str], timeout_s: float = _TIMEOUT_S,
                  dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Delete the consumer groups ``groups``; returns (deleted, not found). A group with
    live members (a consumer that joined it) is a ``UserFacingError``."""
    from confluent_kafka import KafkaError, KafkaException

    if not groups:
        return [], []
    if dry_run:
        existing = {g.group_id for g in admin.list_consumer_groups(
            request_timeout=timeout_s).result(timeout=timeout_s).valid}
        return [g for g in groups if g in existing], [g for g in groups if g not in existing]
    deleted, missing = [], []
    for group, future in admin.delete_consumer_groups(list(groups),
                                                       request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s + 5)
            deleted.append(group)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.NON_EMPTY_GROUP:
                raise UserFacingError(f"consumer group {group} has members: a consumer is "
                                      "still running in it; stop it first") from None
            if code != KafkaError.GROUP_ID_NOT_FOUND:
                raise
            missing.append(group)
    return deleted, missing


def unlink_keys(client, match: str, batch: int = UNLINK_BATCH, dry_run: bool = False) -> int:
    """Remove every Redis key matching the glob ``match`` with SCAN and UNLINK (freed in the
    background), ``batch`` keys per UNLINK; returns how many there were."""
    count, keys = 0, []
    for key in client.scan_iter(match=match, count=batch):
        keys.append(key)
        if len(keys) >= batch:
            count += len(keys) if dry_run else client.unlink(*keys)
            keys = []
    if keys:
        count += len(keys) if dry_run else client.unlink(*keys)
    return count


def drop_keyspace(session, keyspace: str, dry_run: bool = False) -> bool:
    """Drop ``keyspace``; returns whether it existed."""
    rows = session.execute("SELECT keyspace_name FROM system_schema.keyspaces "
                           "WHERE keyspace_name = %s", (keyspace,))
    existed = rows.one() is not None
    if existed and not dry_run:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    return existed


# ---------------------------------------------------------------- the whole clean-up


def clean(settings: StackSettings, *, topic_prefix: str | None = None,
          groups: Iterable[str] = (), keyspace: str | None = None,
          key_prefix: str | None = None, production_ok: bool = False,
          dry_run: bool = False) -> Cleaned:
    """Remove what a run created: topics with ``topic_prefix`` and the groups that
    committed on them only, ``groups``, the Redis keys of ``key_prefix`` and ``keyspace``
    (each only if given). Production names are a ``UserFacingError`` unless
    ``production_ok`` (a group found on the topics is kept instead)."""
    groups = list(dict.fromkeys(groups))
    production = production_names(topic_prefix, groups, keyspace, key_prefix)
    if production and not production_ok:
        raise UserFacingError("refusing to remove what the default deployment uses ("
                              + ", ".join(production) + ") without --yes-production")
    pattern = check_names(keyspace, key_prefix)
    done = Cleaned(topic_prefix=topic_prefix, key_pattern=pattern)
    if topic_prefix is not None or groups:
        admin = _admin(settings.kafka_bootstrap)
        names = topics_of(admin, topic_prefix) if topic_prefix is not None else []
        # Groups first: a deleted topic takes the committed offsets that tell them apart.
        found = [g for g in groups_only_on(admin, names) if g not in groups]
        done.groups_kept = [] if production_ok else [
            g for g in found if production_names(None, [g], None, None)]
        done.groups, done.groups_missing = delete_groups(
            admin, groups + [g for g in found if g not in done.groups_kept], dry_run=dry_run)
        done.topics = names if dry_run else delete_topics(admin, names)
    if pattern is not None:
        from stores.redis.client import new_client

        client = new_client(settings.redis_url)
        try:
            done.keys = unlink_keys(client, pattern, dry_run=dry_run)
        finally:
            client.close()
    if keyspace is not None:
        from stores.cassandra.session import new_cluster

        cluster = new_cluster(settings.cassandra_host, settings.cassandra_port)
        try:
            done.keyspace = keyspace
            done.keyspace_missing = not drop_keyspace(cluster.connect(), keyspace, dry_run)
        finally:
            cluster.shutdown()
    return done


# ---------------------------------------------------------------- command


def register(subparsers) -> None:
    p = subparsers.add_parser("clean", help="remove what a run created (topics, groups, "
                                            "Redis keys, keyspace)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--topic-prefix", default=None, metavar="P",
                   help="remove every topic whose name starts with P ('' is production: "
                        "the event topics and their .dlq twins)")
    p.add_argument("--consumer-group", "--group", dest="groups", action="append", default=[],
                   metavar="G", help="remove this consumer group (repeatable); groups that "
                                     "committed only on the removed topics go anyway")
    p.add_argument("--redis-key-prefix", "--key-prefix", dest="key_prefix", default=None,
                   metavar="R", help="remove the Redis keys R:*")
    p.add_argument("--cassandra-keyspace", "--keyspace", dest="keyspace", default=None,
                   metavar="K", help="drop this keyspace")
    p.add_argument("--yes-production", action="store_true",
                   help="allow the default deployment's names (no prefix, feedbeam-*, fb, "
                        "feedbeam)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")
    p.set_defaults(handler=run_clean)


def running_jobs_on(settings: StackSettings, topic_prefix: str | None, groups: list[str],
                    keyspace: str | None, key_prefix: str | None) -> list[str]:
    """Ids of the running ``feedbeam submit`` jobs that use any of these names."""
    from jobs.submit import load_jobs

    out = []
    for job in load_jobs(settings):
        args = beam_spelling(job.argv)
        job_keyspace = flag_value(args, "--cassandra_keyspace") or DEFAULT_KEYSPACE
        uses = ((topic_prefix is not None and job.topic_prefix == topic_prefix)
                or job.group in groups
                or key_prefix == (flag_value(args, "--redis_key_prefix") or DEFAULT_KEY_PREFIX)
                or keyspace == job_keyspace)
        if uses and job.alive():
            out.append(job.job_id)
    return out


def run_clean(args: argparse.Namespace, settings: StackSettings) -> int:
    from confluent_kafka import KafkaException

    if args.topic_prefix is None and not args.groups and args.keyspace is None \
            and args.key_prefix is None:
        raise UserFacingError("name what to remove: --topic-prefix, --consumer-group, "
                              "--redis-key-prefix, --cassandra-keyspace")
    running = running_jobs_on(settings, args.topic_prefix, args.groups, args.keyspace,
                              args.key_prefix)
    if running:
        raise UserFacingError(f"running jobs use these names: {', '.join(running)}; "
                              "stop them first (`feedbeam cancel JOB`)")
    try:
        done = clean(settings, topic_prefix=args.topic_prefix, groups=args.groups,
                     keyspace=args.keyspace, key_prefix=args.key_prefix,
                     production_ok=args.yes_production, dry_run=args.dry_run)
    except (KafkaException, TimeoutError) as exc:
        raise UserFacingError(f"Kafka at {settings.kafka_bootstrap} failed: {exc}") from None
    for line in done.lines(args.dry_run):
        print(line)
    return 0
