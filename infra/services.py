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
from typing import Callable, Iterable

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
_FLINK_JVM17_OPTS = tuple(
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in (
        "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io",
        "java.net", "java.nio", "java.text", "java.time", "java.util",
        "java.util.concurrent", "java.util.concurrent.atomic",
        "java.util.concurrent.locks", "sun.nio.ch",
    )
) + ("--add-opens=java.sql/java.sql=ALL-UNNAMED",)


def check_names(services: Iterable[str]) -> list[str]:
    """``services`` without repeats, in the given order; UserFacingError for an unknown one."""
    names = list(dict.fromkeys(services))
    unknown = [n for n in names if n not in ALL_SERVICES]
    if unknown:
        raise UserFacingError(
            f"unknown service {', '.join(unknown)}; choose from {', '.join(ALL_SERVICES)}")
    return names


def flink_job_endpoint(settings: StackSettings) -> str:
    """``host:port`` of Beam's Flink job server, for ``--job_endpoint``."""
    return f"{settings.host}:{settings.flink_job_port}"


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
    if not processes.port_open(settings.host, settings.cassandra_port):
        return False
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import WhiteListRoundRobinPolicy

    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([settings.host]),
        request_timeout=timeout_s,
    )
    cluster = Cluster(
        [settings.host],
        port=settings.cassandra_port,
        protocol_version=5,
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
        return row is not None and bool(row.release_version)
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


def _grpc_ready(host: str, port: int, timeout_s: float) -> bool:
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
    """True when the Flink job server's gRPC endpoint answers."""
    return _grpc_ready(settings.host, settings.flink_job_port, timeout_s)


def prism_ready(settings: StackSettings, timeout_s: float = 2.0) -> bool:
    """True when the Prism job server's gRPC endpoint answers."""
    return _grpc_ready(settings.host, settings.prism_job_port, timeout_s)


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
    _render(INFRA_DIR / "kafka.properties", props, {
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
    _render(INFRA_DIR / "cassandra.yaml", config, {
        "host": settings.host,
        "port": settings.cassandra_port,
        "storage_port": settings.cassandra_storage_port,
        "data_dir": home,
    })
    (home / "triggers").mkdir(exist_ok=True)
    classpath = install.classpath(settings, "cassandra")
    jamm = next((p for p in classpath.split(os.pathsep)
                 if Path(p).name.startswith("jamm-")), None)
    heap = settings.cassandra_heap_mb
    cmd = [
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
        f"-Dcassandra.logdir={settings.state_dir / 'logs'}",
        f"-Dlogback.configurationFile={INFRA_DIR / 'cassandra-logback.xml'}",
        "-Dcassandra-foreground=yes",
        # Start-up shortcuts that are safe for one node that never joins a
        # real cluster: no gossip settling, no ring delay, no waiting to
        # create the default superuser (auth is off anyway).
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=100",
        "-Dcassandra.superuser_setup_delay_ms=0",
        # No JMX: neither cassandra.jmx.local.port nor .remote.port is set,
        # so the daemon opens no JMX port (and nodetool is not available).
        "-cp", classpath,
        "org.apache.cassandra.service.CassandraDaemon",
    ]
    processes.spawn(settings, "cassandra", cmd)


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
    classpath = install.classpath(settings, "flink")
    cmd = [
        install.java(), f"-Xmx{settings.flink_heap_mb}m", "-XX:+UseG1GC",
        *_FLINK_JVM17_OPTS,
        "-cp", classpath,
        "org.apache.beam.runners.flink.FlinkJobServerDriver",
        "--job-host", settings.host,
        "--job-port", str(settings.flink_job_port),
        "--artifact-port", str(settings.flink_artifact_port),
        "--expansion-port", str(settings.flink_expansion_port),
        # An embedded Flink mini-cluster inside the job server process.
        "--flink-master", "[local]",
    ]
    processes.spawn(settings, "flink", cmd)


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


def _render(template: Path, target: Path, values: dict[str, object]) -> None:
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
