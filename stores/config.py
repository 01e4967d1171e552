"""Where the stores are: what a pipeline pickles into its DoFns instead of clients."""
from __future__ import annotations

import dataclasses

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KEY_PREFIX = "fb"
DEFAULT_CASSANDRA_HOST = "127.0.0.1"
DEFAULT_CASSANDRA_PORT = 9042
DEFAULT_KEYSPACE = "feedbeam"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Redis URL and key prefix, Cassandra contact point and keyspace."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_key_prefix: str = DEFAULT_KEY_PREFIX
    cassandra_host: str = DEFAULT_CASSANDRA_HOST
    cassandra_port: int = DEFAULT_CASSANDRA_PORT
    cassandra_keyspace: str = DEFAULT_KEYSPACE
