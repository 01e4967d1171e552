"""The four servers of the local stack: names, ports, command lines, readiness probes.

* ``kafka``: one KRaft JVM (broker and controller), from its Maven classpath.
* ``cassandra``: one node, from its Maven classpath.
* ``redis``: Debian's ``redis-server``, append-only file fsynced every second.
* ``prism``: Beam's Prism runner as one job server for every local job
  (``--runner=PrismRunner --job_endpoint=...``), its web UI beside it.
* ``flink``: Beam's Flink job server with an embedded local Flink master.

``start(settings, name)`` renders the server's config from the template
under ``infra/`` into ``<state_dir>/<name>`` and spawns it
(``infra.processes``); ``is_ready(settings, name)`` runs its probe. Which
services start when is ``infra.stack``'s business.
"""
from __future__ import annotations

import base64
import logging
import os
import string
import uuid
from pathlib import Path
from typing import Callable

from infra import install, processes
from infra.errors import UserFacingError
from infra.install import INFRA_DIR
from infra.settings import StackSettings

log = logging.getLogger(__name__)

#: Services ``up`` starts when none are named.
DEFAULT_SERVICES = ("cassandra", "redis", "kafka", "prism")
#: Every service managed here, in start order; ``flink`` starts only when asked for.
ALL_SERVICES = DEFAULT_SERVICES + ("flink",)

#: Seconds between SIGTERM and SIGKILL when stopping. Cassandra drains and
#: Kafka does a controlled shutdown on SIGTERM.
STOP_TIMEOUT_S = {"cassandra": 45.0, "kafka": 45.0, "redis": 10.0, "prism": 10.0,
                  "flink": 20.0}

# Cassandra's conf/jvm17-server.options (5.0): module exports/opens the
# server needs on Java 17, plus its Netty settings.
_CASSANDRA_JVM17_OPTS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)

# Flink 1.19 serializes JDK collections and reflects into java.base; these
# are the opens Flink's own env.java.opts.all sets for Java 17.
FLINK_JVM17_OPTS = tuple(
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in (
        "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io",
        "java.net", "java.nio", "java.text", "java.time", "java.util",
        "java.util.concurrent", "java.util.concurrent.atomic",
        "java.util.concurrent.locks", "sun.nio.ch",
    )
) + ("--add-opens=java.sql/java.sql=ALL-UNNAMED",)


def flink_job_endpoint(settings: StackSettings) -> str:
    """``host:port`` of the topology's Flink job server, for ``--job_endpoint``: the
    single stack's (embedded mini-cluster) or the one submitting to the session
    cluster (``infra.cluster``)."""
    port = settings.cluster_flink_job_port if settings.clustered else settings.flink_job_port
    return f"{settings.host}:{port}"


def prism_job_endpoint(settings: StackSettings) -> str:
    """``host:port`` of the shared Prism job server, for ``--job_endpoint``."""
    return f"{settings.host}:{settings.prism_job_port}"


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------


def main_port(settings: StackSettings, name: str) -> int:
    """The port clients use."""
    return {
        "kafka": settings.kafka_port,
        "cassandra": settings.cassandra_port,
        "redis": settings.redis_port,
        "prism": settings.prism_job_port,
        "flink": settings.flink_job_port,
    }[name]


def _all_ports(settings: StackSettings, name: str) -> list[int]:
    return {
        "kafka": [settings.kafka_port, settings.kafka_controller_port],
        "cassandra": [settings.cassandra_port, settings.cassandra_storage_port],
        "redis": [settings.redis_port],
        "prism": [settings.prism_job_port, settings.prism_web_port],
        "flink": [settings.flink_job_port, settings.flink_artifact_port,
                  settings.flink_expansion_port],
    }[name]


def check_ports_free(settings: StackSettings, name: str) -> None:
    """UserFacingError if any port ``name`` listens on is already taken."""
    for port in _all_ports(settings, name):
        if processes.port_open(settings.host, port):
            env = f"FEEDBEAM_{name.upper()}_PORT" if port == main_port(settings, name) \
                else "the FEEDBEAM_*_PORT variables"
            raise UserFacingError(
                f"port {settings.host}:{port} needed by {name} is taken by a "
                f"process feedbeam did not start (see `ss -ltnp 'sport = :{port}'`); "
                f"stop it, or move {name} with {env}")


# --------------------------------------------------------------------------
# Readiness probes
# --------------------------------------------------------------------------


def kafka_ready(settings: StackSettings, timeout_s: float = 3.0) -> bool:
    """True when the broker answers a metadata request with itself in it."""
    if not processes.port_open(settings.host, settings.kafka_port):
        return False
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({
        "bootstrap.servers": settings.kafka_bootstrap,
        # librdkafka logs every refused connection at ERROR; while we poll a
        # starting broker those are expected, so keep it quiet.
        "log_level": 0,
    })
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except Exception:  # KafkaException while the broker is still starting
        return False
    return bool(metadata.brokers)


def cassandra_ready(settings: StackSettings, timeout_s: float = 5.0) -> bool:
    """True when the node answers ``SELECT release_version FROM system.local``."""
    return cassandra_node_ready(settings.host, settings.cassandra_port, timeout_s=timeout_s)


def cassandra_node_ready(host: str, port: int, peers: int = 0, timeout_s: float = 5.0) -> bool:
    """True when the node at ``host:port`` answers ``SELECT release_version FROM
    system.local`` and knows at least ``peers`` other nodes (``system.peers_v2``)."""
    if not processes.port_open(host, port):
        return False
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([host]),
        request_timeout=timeout_s,
    )
    cluster = Cluster(
        [host],
        port=port,
        protocol_version=5,
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        if row is None or not row.release_version:
            return False
        return peers == 0 or len(list(session.execute("SELECT peer FROM system.peers_v2"))) >= peers
    except Exception:  # NoHostAvailable, OperationTimedOut while starting
        return False
    finally:
        cluster.shutdown()


def redis_ready(settings: StackSettings, timeout_s: float = 1.0) -> bool:
    """True when Redis answers PING."""
    if not processes.port_open(settings.host, settings.redis_port):
        return False
    import redis

    client = redis.Redis(host=settings.host, port=settings.redis_port,
                         socket_timeout=timeout_s,
                         socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def grpc_ready(host: str, port: int, timeout_s: float) -> bool:
    """True when a gRPC endpoint completes an HTTP/2 handshake."""
    if not processes.port_open(host, port):
        return False
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def flink_ready(settings: StackSettings, timeout_s: float = 2.0) -> bool:
    """True when the single stack's Flink job server's gRPC endpoint answers."""
    return grpc_ready(settings.host, settings.flink_job_port, timeout_s)


def flink_job_server_ready(settings: StackSettings, timeout_s: float = 2.0) -> bool:
    """True when the topology's Flink job server (``flink_job_endpoint``) answers."""
    host, port = flink_job_endpoint(settings).rsplit(":", 1)
    return grpc_ready(host, int(port), timeout_s)


def prism_ready(settings: StackSettings, timeout_s: float = 2.0) -> bool:
    """True when the Prism job server's gRPC endpoint answers."""
    return grpc_ready(settings.host, settings.prism_job_port, timeout_s)


_READY: dict[str, Callable[[StackSettings], bool]] = {
    "kafka": kafka_ready,
    "cassandra": cassandra_ready,
    "redis": redis_ready,
    "prism": prism_ready,
    "flink": flink_ready,
}


def is_ready(settings: StackSettings, name: str) -> bool:
    """Run the readiness probe of one service by name."""
    return _READY[name](settings)


# --------------------------------------------------------------------------
# Starting each server
# --------------------------------------------------------------------------


def start(settings: StackSettings, name: str) -> None:
    """Render the config of ``name`` and spawn it; returns at once (not ready yet)."""
    _START[name](settings)


def _start_kafka(settings: StackSettings) -> None:
    home = settings.state_dir / "kafka"
    props = home / "server.properties"
    render(INFRA_DIR / "kafka.properties", props, {
        "host": settings.host,
        "port": settings.kafka_port,
        "controller_port": settings.kafka_controller_port,
        "data_dir": home / "data",
    })
    classpath = install.classpath(settings, "kafka")
    common = [
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={INFRA_DIR / 'kafka-log4j2.yaml'}",
        f"-Dkafka.logs.dir={settings.state_dir / 'logs'}",
        "-cp", classpath,
    ]
    if not (home / "data" / "meta.properties").exists():
        # KRaft storage is formatted once, with a cluster id kept in the
        # state dir so a re-format after a partial wipe keeps the same id.
        cluster_id = _cluster_id(home / "cluster.id")
        log.info("kafka: formatting KRaft storage (cluster id %s)", cluster_id)
        processes.run(
            [install.java(), "-Xmx256m", *common, "kafka.tools.StorageTool", "format",
             "--ignore-formatted", f"--cluster-id={cluster_id}", f"--config={props}"],
            processes.log_path(settings, "kafka"), what="formatting Kafka storage")
    heap = settings.kafka_heap_mb
    processes.spawn(settings, "kafka", [
        install.java(), f"-Xms{min(heap, 256)}m", f"-Xmx{heap}m",
        "-XX:+ExitOnOutOfMemoryError",
        # Kafka's own defaults from kafka-run-class.sh.
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
        *common, "kafka.Kafka", str(props)])


def _start_cassandra(settings: StackSettings) -> None:
    home = settings.state_dir / "cassandra"
    config = home / "cassandra.yaml"
    render(INFRA_DIR / "cassandra.yaml", config, {
        "cluster_name": "feedbeam-local",
        "initial_token": 0,
        "seeds": f"{settings.host}:{settings.cassandra_storage_port}",
        "host": settings.host,
        "port": settings.cassandra_port,
        "storage_port": settings.cassandra_storage_port,
        "data_dir": home,
    })
    pid = processes.spawn(settings, "cassandra", cassandra_command(
        settings, home, config, settings.cassandra_heap_mb, settings.state_dir / "logs"))
    if settings.cassandra_nice:
        processes.lower_priority(pid, settings.cassandra_nice)


def cassandra_command(settings: StackSettings, home: Path, config: Path, heap: int,
                      log_dir: Path, ring_delay_ms: int = 100) -> list[str]:
    """The command line of one Cassandra node with its data in ``home`` and its
    rendered ``config``; ``heap`` in MiB bounds its heap. ``ring_delay_ms`` is also
    how long gossip keeps a peer without tokens: nodes of a cluster need seconds."""
    (home / "triggers").mkdir(exist_ok=True)
    classpath = install.classpath(settings, "cassandra")
    jamm = next((p for p in classpath.split(os.pathsep)
                 if Path(p).name.startswith("jamm-")), None)
    return [
        # A small initial heap keeps an idle dev node's RSS well below the
        # bound; -Xmx is the bound.
        install.java(), f"-Xms{min(heap, 256)}m", f"-Xmx{heap}m", "-Xss256k",
        "-XX:+ExitOnOutOfMemoryError",
        "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxGCPauseMillis=300",
        "-XX:+PerfDisableSharedMem", "-Djava.net.preferIPv4Stack=true",
        *_CASSANDRA_JVM17_OPTS,
        # jamm measures memtable sizes; as an agent it uses instrumentation
        # rather than falling back to slower estimates.
        *([f"-javaagent:{jamm}"] if jamm else []),
        f"-Dcassandra.config={config.as_uri()}",
        f"-Dcassandra.storagedir={home}",
        f"-Dcassandra.triggers_dir={home / 'triggers'}",
        f"-Dcassandra.logdir={log_dir}",
        f"-Dlogback.configurationFile={INFRA_DIR / 'cassandra-logback.xml'}",
        "-Dcassandra-foreground=yes",
        # Start-up shortcuts that are safe for one node, and for the cluster
        # topology's nodes, which are all seeds and never bootstrap: no gossip
        # settling, no (one node) or a short ring delay, no waiting to create
        # the default superuser (auth is off anyway).
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        f"-Dcassandra.ring_delay_ms={ring_delay_ms}",
        "-Dcassandra.superuser_setup_delay_ms=0",
        # No JMX: neither cassandra.jmx.local.port nor .remote.port is set,
        # so the daemon opens no JMX port (and nodetool is not available).
        "-cp", classpath,
        "org.apache.cassandra.service.CassandraDaemon",
    ]


def _start_redis(settings: StackSettings) -> None:
    home = settings.state_dir / "redis"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [
        install.redis_server(), "--bind", settings.host, "--port", str(settings.redis_port),
        "--daemonize", "no", "--dir", str(home), "--logfile", "",
        # Append-only file, fsynced every second: a restart keeps the
        # materialized views; a crash loses at most the last second of
        # writes, which `feedbeam rebuild` restores from Cassandra. No RDB
        # snapshots (the AOF is the one copy on disk).
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--protected-mode", "yes",
    ]
    processes.spawn(settings, "redis", cmd)


def _start_flink(settings: StackSettings) -> None:
    # An embedded Flink mini-cluster inside the job server process.
    processes.spawn(settings, "flink", flink_job_server_command(
        settings, "[local]", settings.flink_job_port, settings.flink_artifact_port,
        settings.flink_expansion_port, settings.flink_heap_mb))


def flink_job_server_command(settings: StackSettings, master: str, job_port: int,
                             artifact_port: int, expansion_port: int, heap_mb: int,
                             conf_dir: Path | None = None) -> list[str]:
    """Beam's Flink job server on ``job_port`` running jobs on ``master`` (``[local]``
    or a JobManager's REST ``host:port``), its Flink client configured by
    ``conf_dir/flink-conf.yaml`` when given."""
    return [
        install.java(), f"-Xmx{heap_mb}m", "-XX:+UseG1GC",
        *FLINK_JVM17_OPTS,
        "-cp", install.classpath(settings, "flink"),
        "org.apache.beam.runners.flink.FlinkJobServerDriver",
        "--job-host", settings.host,
        "--job-port", str(job_port),
        "--artifact-port", str(artifact_port),
        "--expansion-port", str(expansion_port),
        "--flink-master", master,
        *(["--flink-conf-dir", str(conf_dir)] if conf_dir else []),
    ]


def _start_prism(settings: StackSettings) -> None:
    # One job server for every local job: each job still runs its SDK workers
    # LOOPBACK in the process that submitted it. Never shut down when idle.
    processes.spawn(settings, "prism", [
        str(install.prism_binary(settings)),
        "--job_port", str(settings.prism_job_port),
        "--web_port", str(settings.prism_web_port),
        "--idle_shutdown_timeout", "-1ns",
        "--log_level", "warn", "--log_kind", "text",
    ])


_START: dict[str, Callable[[StackSettings], None]] = {
    "kafka": _start_kafka,
    "cassandra": _start_cassandra,
    "redis": _start_redis,
    "prism": _start_prism,
    "flink": _start_flink,
}


def render(template: Path, target: Path, values: dict[str, object]) -> None:
    """Fill a ``${name}`` template; rewrite only when the content changes."""
    text = string.Template(template.read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


def _cluster_id(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    while True:
        # Kafka's Uuid.toString(): 16 random bytes, URL-safe base64, no
        # padding. Skip ids starting with '-' so no tool mistakes one for a flag.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id + "\n")
    return cluster_id
