"""Shared fixtures: the real local stack, isolated per test.

Integration tests (marked ``integration``) talk to the Kafka, Cassandra and
Redis that ``feedbeam infra up`` started. Nothing here starts or stops the
single stack: the test command does that before pytest runs. When a server
does not answer, the test fails with a message naming it; it is never skipped.

With ``FEEDBEAM_TOPOLOGY=cluster`` (or in ``test_cluster``, marked ``cluster``)
the same fixtures point at the cluster topology (Redis Cluster, 2 Cassandra
nodes with keyspaces at replication factor 2, the Flink session cluster), and
``stack`` starts it first (``infra.stack.up``, a no-op when it runs).

Isolation: every test gets its own Kafka topics, Cassandra keyspace and Redis
key prefix, all removed afterwards, so tests can run in any order.
"""
from __future__ import annotations

import uuid

import pytest

from infra.settings import CLUSTER_CASSANDRA_NODES, StackSettings
from stores.cassandra.session import create_keyspace, new_cluster
from stores.redis.client import new_client

_READY_TIMEOUT_S = 10.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: needs the real Kafka, Cassandra and Redis")
    config.addinivalue_line(
        "markers", "cluster: runs on the cluster topology (`feedbeam infra up --topology "
        "cluster`, started by the fixture)")


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def _check_kafka(settings: StackSettings) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.list_topics(timeout=_READY_TIMEOUT_S)


def _check_redis(settings: StackSettings) -> None:
    client = new_client(settings.redis_url)
    try:
        client.ping()
    finally:
        client.close()


def _check_cassandra(settings: StackSettings) -> None:
    cluster = new_cluster(settings.cassandra_host, settings.cassandra_port,
                          connect_timeout=_READY_TIMEOUT_S)
    try:
        cluster.connect().execute("SELECT release_version FROM system.local")
    finally:
        cluster.shutdown()


def checked_stack(settings: StackSettings) -> StackSettings:
    """``settings`` once Kafka, Redis and Cassandra of its topology answer; starts the
    cluster topology first when it is the one asked for. Fails (not skips) if a
    server is down."""
    if settings.clustered:
        from infra import stack as infra_stack
        from infra.errors import UserFacingError

        try:
            infra_stack.up(settings)
        except UserFacingError as exc:
            pytest.fail(f"the cluster topology did not start: {exc}", pytrace=False)
    problems = []
    for name, check in (("Kafka", _check_kafka), ("Redis", _check_redis),
                        ("Cassandra", _check_cassandra)):
        try:
            check(settings)
        except Exception as exc:  # report every server that is down at once
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    if problems:
        pytest.fail(
            "the local stack is not answering; start it with "
            "`feedbeam infra up` (or run the README's test command):\n  "
            + "\n  ".join(problems), pytrace=False)
    return settings


@pytest.fixture(scope="session")
def stack() -> StackSettings:
    """The running local stack (of ``FEEDBEAM_TOPOLOGY``); see ``checked_stack``."""
    return checked_stack(StackSettings.from_env())


@pytest.fixture
def redis_client(stack):
    client = new_client(stack.redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client) -> str:
    """A Redis key prefix owned by this test; its keys are deleted afterwards."""
    from jobs.clean import unlink_keys

    prefix = _unique("t")
    yield prefix
    unlink_keys(redis_client, f"{prefix}*")  # also prefixes a test derives from it


@pytest.fixture(scope="session")
def cassandra_session(stack):
    cluster = new_cluster(stack.cassandra_host, stack.cassandra_port)
    session = cluster.connect()
    yield session
    cluster.shutdown()


@pytest.fixture
def keyspace(stack, cassandra_session) -> str:
    """A keyspace name owned by this test, dropped afterwards. Not created on the
    single stack; on the cluster topology created at replication factor 2, so the
    test's ``migrate`` keeps it and the stores write at LOCAL_QUORUM."""
    from jobs.clean import drop_keyspace

    name = _unique("t_")
    if stack.clustered:
        create_keyspace(cassandra_session, name, CLUSTER_CASSANDRA_NODES)
    yield name
    drop_keyspace(cassandra_session, name)


@pytest.fixture
def kafka_topic(stack):
    """Factory: ``kafka_topic(partitions=3, name=None) -> str`` creates a topic.

    Every topic it created is deleted when the test ends.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    from jobs.topics import wait_until_visible

    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    created: list[str] = []

    def create(partitions: int = 3, name: str | None = None) -> str:
        topic = name or _unique("t.")
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30)
        futures[topic].result(timeout=60)
        created.append(topic)
        wait_until_visible(admin, [topic], timeout_s=60)
        return topic

    yield create
    from jobs.clean import delete_topics

    delete_topics(admin, created)
