"""Consistency levels follow the keyspace's replication (``apply_consistency``) on the real
Cassandra: LOCAL_ONE for one replica, LOCAL_QUORUM for more, unless named."""
from __future__ import annotations

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, NoHostAvailable

from stores.cassandra.session import (
    READ_PROFILE, apply_consistency, create_keyspace, open_on_new_cluster,
)

pytestmark = pytest.mark.integration


def _table(session, keyspace: str, replication_factor: int) -> None:
    create_keyspace(session, keyspace, replication_factor)
    session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.kv (k int PRIMARY KEY, v int)",
                    timeout=60)


def test_levels_follow_the_replication_factor_and_apply_to_statements(stack, keyspace):
    cluster, session = open_on_new_cluster(stack.host, stack.cassandra_port, lambda s: s,
                                           wait_s=30)
    try:
        _table(session, keyspace, 1)
        assert apply_consistency(session, keyspace) == (ConsistencyLevel.LOCAL_ONE,
                                                        ConsistencyLevel.LOCAL_ONE)
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (1, 1)")
        # Three replicas on a one-node cluster: a LOCAL_QUORUM write cannot be met,
        # which shows the level reached the statement.
        session.execute(f"ALTER KEYSPACE {keyspace} WITH replication = "
                        "{'class': 'NetworkTopologyStrategy', 'datacenter1': 3}", timeout=60)
        session.cluster.refresh_keyspace_metadata(keyspace)
        assert apply_consistency(session, keyspace) == (ConsistencyLevel.LOCAL_QUORUM,
                                                        ConsistencyLevel.LOCAL_QUORUM)
        # (The driver reports the server's Unavailable as no host being able to serve.)
        with pytest.raises(NoHostAvailable, match="LOCAL_QUORUM"):
            session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (2, 2)")
        with pytest.raises(NoHostAvailable, match="LOCAL_QUORUM"):
            session.execute(f"SELECT v FROM {keyspace}.kv WHERE k = 1",
                            execution_profile=READ_PROFILE)
        # Named levels win over the replication factor.
        assert apply_consistency(session, keyspace, read="ONE", write="ONE") == (
            ConsistencyLevel.ONE, ConsistencyLevel.ONE)
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (2, 2)")
        profiles = session.cluster.profile_manager.profiles
        assert profiles[EXEC_PROFILE_DEFAULT].consistency_level == ConsistencyLevel.ONE
    finally:
        cluster.shutdown()


def test_open_on_new_cluster_applies_the_levels_for_the_store_keyspace(stack, keyspace,
                                                                       cassandra_session):
    _table(cassandra_session, keyspace, 1)
    cluster, session = open_on_new_cluster(stack.host, stack.cassandra_port, lambda s: s,
                                           wait_s=30, keyspace=keyspace,
                                           write_consistency="LOCAL_QUORUM")
    try:
        profiles = session.cluster.profile_manager.profiles
        assert profiles[EXEC_PROFILE_DEFAULT].consistency_level == ConsistencyLevel.LOCAL_QUORUM
        assert profiles[READ_PROFILE].consistency_level == ConsistencyLevel.LOCAL_ONE
    finally:
        cluster.shutdown()
