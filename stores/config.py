"""Where the stores are: what a pipeline pickles into its DoFns instead of clients."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stores.kafka.lag import LogCatchUp

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KEY_PREFIX = "fb"
DEFAULT_CASSANDRA_HOST = "127.0.0.1"
DEFAULT_CASSANDRA_PORT = 9042
DEFAULT_KEYSPACE = "feedbeam"
#: Statements per unlogged batch of the Cassandra stores (``CassandraFeedStore``'s
#: ``batch_rows``): docs/architecture.md, "Stores".
DEFAULT_CASSANDRA_BATCH_ROWS = 200
#: The most statements the native protocol allows in one batch.
MAX_CASSANDRA_BATCH_ROWS = 0xFFFF


def check_batch_rows(rows: int) -> int:
    """``rows`` if a batch may hold that many statements; else ValueError."""
    if not 1 <= rows <= MAX_CASSANDRA_BATCH_ROWS:
        raise ValueError(f"--cassandra_batch_rows takes an integer 1-"
                         f"{MAX_CASSANDRA_BATCH_ROWS:,}, not {rows!r}")
    return rows


#: Consistency level chosen by the keyspace's replication (``stores.cassandra.session``).
AUTO_CONSISTENCY = "auto"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Redis URL and key prefix, Cassandra contact point and keyspace, and the
    Cassandra consistency levels of reads and writes (names of the driver's
    levels, or ``auto``: LOCAL_QUORUM when the keyspace is replicated, else
    LOCAL_ONE; applied by ``stores.cassandra.session.open_on_new_cluster``).

    ``restore_log``: what a restore of a Redis that lost its data waits for
    before it reads Cassandra (the fan-out's durable step applying its log;
    None: no wait), whichever job runs the restore (``stores.restore``)."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_key_prefix: str = DEFAULT_KEY_PREFIX
    cassandra_host: str = DEFAULT_CASSANDRA_HOST
    cassandra_port: int = DEFAULT_CASSANDRA_PORT
    cassandra_keyspace: str = DEFAULT_KEYSPACE
    cassandra_read_consistency: str = AUTO_CONSISTENCY
    cassandra_write_consistency: str = AUTO_CONSISTENCY
    restore_log: LogCatchUp | None = None
    cassandra_batch_rows: int = DEFAULT_CASSANDRA_BATCH_ROWS

    def __post_init__(self):
        check_batch_rows(self.cassandra_batch_rows)

    @property
    def cassandra_options(self) -> dict:
        """The levels and rows per batch as keyword arguments of the Cassandra
        stores' ``connect``."""
        return {"read_consistency": self.cassandra_read_consistency,
                "write_consistency": self.cassandra_write_consistency,
                "batch_rows": self.cassandra_batch_rows}
