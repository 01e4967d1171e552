"""Where the local stack lives and which ports it listens on.

Every knob has a default that works on a fresh machine and an environment
variable that overrides it; the CLI reads the environment once, at start-up,
and passes a ``StackSettings`` down. Nothing below the CLI reads the
environment.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

KAFKA_VERSION = "4.3.0"
CASSANDRA_VERSION = "5.0.8"
BEAM_VERSION = "2.77.0"

#: ``feedbeam infra up --topology``: one node of everything, or clusters of them.
TOPOLOGIES = ("single", "cluster")
CLUSTER_REDIS_NODES = 3
CLUSTER_CASSANDRA_NODES = 2
CLUSTER_TASKMANAGERS = 2


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """Locations and ports of the local stack.

    ``cache_dir`` holds downloads (Maven repository, Go module and build
    caches, the Prism binary) and may be shared between checkouts;
    ``state_dir`` holds data, logs and pid files of one checkout's servers.
    """

    cache_dir: Path = Path.home() / ".cache" / "feedbeam"
    state_dir: Path = REPO_ROOT / ".state"
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    redis_port: int = 6379
    flink_job_port: int = 8099
    flink_artifact_port: int = 8098
    flink_expansion_port: int = 8097
    #: Prism's job service (Beam's default port) and its web UI.
    prism_job_port: int = 8073
    prism_web_port: int = 8074
    cassandra_heap_mb: int = 1024
    #: OS niceness of the local Cassandra (``infra.processes.lower_priority``): on
    #: one machine with the serving API its flushes, compactions and collections
    #: gave way to requests (API p99 at 1,000 requests/s 65-122 ms, 145-245 ms at 0:
    #: docs/benchmarks.md); the API reads it only when Redis fails, and the jobs'
    #: durable steps trail their Redis writes anyway. 0: as the other servers.
    cassandra_nice: int = 10
    kafka_heap_mb: int = 512
    #: The job server embeds a Flink mini-cluster: every job's tasks share this heap
    #: (1.5 GB ran out in a full test run: the JVM spent a core in GC, jobs hung).
    flink_heap_mb: int = 3072
    ready_timeout_s: float = 180.0
    #: ``single`` (the servers above) or ``cluster`` (the ``cluster_*`` servers
    #: below, beside the single ones; Kafka is the single broker in both): which
    #: servers ``redis_url``, ``cassandra_host`` and the Flink job endpoint name.
    topology: str = "single"
    #: Redis Cluster: ``CLUSTER_REDIS_NODES`` masters on consecutive ports from this one.
    cluster_redis_port: int = 7001
    #: Cassandra cluster: ``CLUSTER_CASSANDRA_NODES`` nodes on consecutive loopback
    #: addresses from this one (Linux routes all of 127/8 to lo), each on
    #: ``cassandra_port`` and ``cassandra_storage_port``.
    cluster_cassandra_host: str = "127.0.0.2"
    cluster_cassandra_heap_mb: int = 768
    #: The Flink session cluster: its JobManager's REST (``--flink-master``), RPC
    #: and blob ports, and the Beam job server that submits to it.
    cluster_flink_rest_port: int = 8281
    cluster_flink_rpc_port: int = 6223
    cluster_flink_blob_port: int = 6224
    cluster_flink_job_port: int = 8199
    cluster_flink_artifact_port: int = 8198
    cluster_flink_expansion_port: int = 8197
    cluster_jobmanager_heap_mb: int = 512
    #: Heap of each TaskManager (framework + task heap); see ``infra.cluster``.
    #: Its slots share the task heap (Beam's state lives there).
    cluster_taskmanager_heap_mb: int = 896
    #: Task slots per TaskManager: the four pipelines at parallelism 2 take 8.
    cluster_taskmanager_slots: int = 4
    cluster_jobserver_heap_mb: int = 512

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def clustered(self) -> bool:
        return self.topology == "cluster"

    @property
    def redis_url(self) -> str:
        """The Redis of the topology: ``redis+cluster://`` names a Redis Cluster
        by one of its nodes (``stores.redis.client``)."""
        if self.clustered:
            return f"redis+cluster://{self.host}:{self.cluster_redis_port}/0"
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def cassandra_host(self) -> str:
        """The Cassandra contact point of the topology (its port is ``cassandra_port``)."""
        return self.cluster_cassandra_host if self.clustered else self.host

    @property
    def maven_repo(self) -> Path:
        return self.cache_dir / "m2"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "StackSettings":
        """Build settings from ``FEEDBEAM_*`` variables, defaults elsewhere."""
        env = os.environ if environ is None else environ
        overrides: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get("FEEDBEAM_" + field.name.upper())
            if raw is None or raw == "":
                continue
            try:
                if field.name.endswith("_dir"):
                    overrides[field.name] = Path(raw).expanduser().resolve()
                elif field.name.endswith("host") or field.name == "topology":
                    overrides[field.name] = raw
                elif field.name.endswith("_s"):
                    overrides[field.name] = float(raw)
                else:
                    overrides[field.name] = int(raw)
            except ValueError:
                raise ValueError(
                    f"FEEDBEAM_{field.name.upper()}={raw!r} is not a valid "
                    f"{'number' if not field.name.endswith('_dir') else 'path'}") from None
        if overrides.get("topology", "single") not in TOPOLOGIES:
            raise ValueError(f"FEEDBEAM_TOPOLOGY={overrides['topology']!r}: "
                             f"one of {', '.join(TOPOLOGIES)}")
        if not 0 <= overrides.get("cassandra_nice", 0) <= 19:
            raise ValueError(f"FEEDBEAM_CASSANDRA_NICE={overrides['cassandra_nice']}: "
                             "a niceness from 0 to 19")
        return cls(**overrides)
