"""``feedbeam topics``: create and list the event topics and the dead-letter topics.

    feedbeam topics create [--partitions 3] [--replication-factor 1] [--topic-prefix ""]
    feedbeam topics list [--topic-prefix ""]

``create`` is idempotent: topics that exist already are reported and left as
they are. ``create_topics()`` and ``describe_topics()`` are the function API
behind the commands.
"""
from __future__ import annotations

import time

from infra.settings import StackSettings
from infra.errors import UserFacingError
from schemas.events import DERIVED_DLQ_SOURCES, TOPICS, dlq_topic

_TIMEOUT_S = 30.0


def feed_topics(prefix: str = "") -> list[str]:
    """The four event topics and their ``.dlq`` twins, then every other ``.dlq`` topic a
    pipeline may write (``schemas.events.DERIVED_DLQ_SOURCES``: the features' store
    sinks, the fan-out's and the stories' durable logs), each name prefixed. With all of them there, a
    dead letter never fails its bundle on a missing topic."""
    names = []
    for topic in TOPICS:
        names += [prefix + topic, dlq_topic(prefix + topic)]
    return names + [dlq_topic(prefix + source) for source in DERIVED_DLQ_SOURCES]


def _admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap})


def create_topics(
    bootstrap: str,
    names: list[str],
    partitions: int = 3,
    replication_factor: int = 1,
    timeout_s: float = _TIMEOUT_S,
) -> dict[str, str]:
    """Create ``names``; returns ``{name: "created" | "exists"}``.

    Other failures raise ``KafkaException`` (e.g. a replication factor above the
    broker count) or ``TimeoutError`` (broker unreachable).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    if not names:
        return {}
    admin = _admin(bootstrap)
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
         for n in names],
        operation_timeout=timeout_s, request_timeout=timeout_s)
    status: dict[str, str] = {}
    for name in names:
        try:
            futures[name].result(timeout=timeout_s + 5)
            status[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            status[name] = "exists"
    wait_until_visible(admin, names, timeout_s)
    return status


def wait_until_visible(admin, names: list[str], timeout_s: float = _TIMEOUT_S) -> None:
    """Wait until the broker's metadata lists every topic of ``names`` with a leader for
    each partition. With KRaft a topic's creation returns once the controller has it;
    the broker's metadata cache catches up a moment later, and a producer or consumer
    that asks in between is told the topic does not exist."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while True:
        topics = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        pending = [n for n in pending if not _ready(topics.get(n))]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics created but not visible in the broker's metadata after "
                               f"{timeout_s:.0f}s: {', '.join(pending)}")
        time.sleep(0.1)


def _ready(topic) -> bool:
    return (topic is not None and topic.error is None and bool(topic.partitions)
            and all(p.leader >= 0 and p.error is None for p in topic.partitions.values()))


def _settling(error) -> bool:
    """Whether a Kafka error is the metadata of a new topic or a leader move catching up."""
    from confluent_kafka import KafkaError

    # Admin results carry bare error codes whose retriable() flag is not set.
    return error.retriable() or error.code() in (
        KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART)


def describe_topics(bootstrap: str, prefix: str = "", names: list[str] | None = None,
                    timeout_s: float = _TIMEOUT_S) -> list[tuple[str, int, int]]:
    """``(name, partitions, sum of end offsets)`` of non-internal topics starting with ``prefix``.

    With ``names``, waits (up to ``timeout_s``) until every one of them is in
    the broker's metadata, which lags a moment behind topic creation.
    """
    from confluent_kafka import TopicPartition

    admin = _admin(bootstrap)
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        metadata = admin.list_topics(timeout=timeout_s)
        topics = sorted(
            (name, t) for name, t in metadata.topics.items()
            if name.startswith(prefix) and not name.startswith("__"))
        # A topic created a moment ago may report LEADER_NOT_AVAILABLE for a while.
        settling = any(t.error is not None and _settling(t.error) for _, t in topics)
        settling |= bool(names) and not set(names) <= metadata.topics.keys()
        if not settling or time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    ends = _end_offsets(
        admin, [TopicPartition(name, p) for name, t in topics for p in t.partitions], timeout_s)
    totals = {name: 0 for name, _ in topics}
    for (name, _), end in ends.items():
        totals[name] += max(end, 0)
    return [(name, len(t.partitions), totals[name]) for name, t in topics]


def _end_offsets(admin, partitions: list, timeout_s: float) -> dict[tuple[str, int], int]:
    """Latest offset of each partition, retrying retriable errors (leader moves, new topics)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import OffsetSpec

    deadline = time.monotonic() + timeout_s
    ends: dict[tuple[str, int], int] = {}
    pending, delay = partitions, 0.1
    while pending:
        futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in pending},
                                     request_timeout=timeout_s)
        retry = []
        for tp, future in futures.items():
            try:
                ends[(tp.topic, tp.partition)] = future.result(timeout=timeout_s).offset
            except KafkaException as exc:
                if not _settling(exc.args[0]) or time.monotonic() + delay > deadline:
                    raise
                retry.append(tp)
        if retry:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        pending = retry
    return ends


def register(subparsers) -> None:
    parser = subparsers.add_parser("topics", help="create or list the Kafka topics")
    sub = parser.add_subparsers(dest="topics_command", metavar="ACTION")
    sub.required = True

    create = sub.add_parser("create", help="create the event topics, their .dlq twins and "
                                           "the other .dlq topics the pipelines write")
    create.add_argument("--partitions", type=int, default=3, help="default: %(default)s")
    create.add_argument("--replication-factor", type=int, default=1, help="default: %(default)s")
    create.add_argument("--topic-prefix", "--prefix", dest="prefix", default="",
                        help="prefix of every topic name (default: none)")
    create.set_defaults(handler=handle_create)

    list_ = sub.add_parser("list", help="topics with partition counts and end offsets")
    list_.add_argument("--topic-prefix", "--prefix", dest="prefix", default="",
                       help="only topics starting with this")
    list_.set_defaults(handler=handle_list)


def _kafka_down(settings: StackSettings, exc: Exception) -> UserFacingError:
    detail = str(exc) or type(exc).__name__
    return UserFacingError(
        f"Kafka at {settings.kafka_bootstrap} failed: {detail}; is it up (`feedbeam infra status`)?")


def handle_create(args, settings: StackSettings) -> int:
    from confluent_kafka import KafkaException

    if args.partitions < 1 or args.replication_factor < 1:
        raise UserFacingError("--partitions and --replication-factor must be at least 1")
    try:
        status = create_topics(settings.kafka_bootstrap, feed_topics(args.prefix),
                               args.partitions, args.replication_factor)
    except (KafkaException, TimeoutError) as exc:
        raise _kafka_down(settings, exc) from exc
    for name, state in status.items():
        print(f"{name}: {state}")
    created = sum(s == "created" for s in status.values())
    print(f"{created} created, {len(status) - created} existing")
    return 0


def handle_list(args, settings: StackSettings) -> int:
    from confluent_kafka import KafkaException

    try:
        rows = describe_topics(settings.kafka_bootstrap, args.prefix)
    except (KafkaException, TimeoutError) as exc:
        raise _kafka_down(settings, exc) from exc
    width = max([len("topic")] + [len(r[0]) for r in rows])
    print(f"{'topic':<{width}}  partitions  end_offsets")
    for name, partitions, end in rows:
        print(f"{name:<{width}}  {partitions:>10}  {end:>11}")
    return 0
