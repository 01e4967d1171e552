"""The local stack: Kafka, Cassandra and Redis on loopback, plus Beam runners.

Run it with the CLI::

    feedbeam infra install             # fetch/build everything, start nothing
    feedbeam infra up [--with-flink]   # install if needed, start, wait until ready
    feedbeam infra up flink            # start only Beam's Flink job server
    feedbeam infra status              # one line per service
    feedbeam infra logs kafka -n 100 -f
    feedbeam infra down                # stop what `up` started

or from Python (tests, benchmarks): ``up(settings)``, ``down(settings)``,
``status(settings)``, the ``*_ready(settings)`` probes, ``prism_binary``
and ``flink_job_endpoint``.

No Docker: every server comes from a package registry and runs as a plain
child process of the project.

* Kafka (KRaft, broker and controller in one JVM) and Cassandra run from
  their Maven Central artifacts. Small poms under ``infra/`` are resolved to
  a classpath by Maven into ``<cache_dir>/m2``; nothing is copied or built.
* Redis is Debian's ``redis-server`` (apt-installed when missing); a Redis
  that already answers PING on the port is used as is and never stopped.
* Prism, Beam's portable local runner, is built with ``go install`` from the
  Go module proxy into ``<cache_dir>/prism/v<BEAM_VERSION>``. Beam starts it
  per pipeline (``--prism_location``); it is not a service here.
* Beam's Flink job server (with an embedded local Flink master) is resolved
  by ``up`` but started only on request, because it costs ~1 GiB.

Downloads live under ``settings.cache_dir``; data, rendered configs, logs and
pid files under ``settings.state_dir``. ``down`` stops only processes whose
pid file ``up`` wrote (and whose start time still matches, so a recycled pid
is never signalled).
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from infra.settings import (
    BEAM_VERSION,
    CASSANDRA_VERSION,
    KAFKA_VERSION,
    StackSettings,
)
from infra.errors import UserFacingError

log = logging.getLogger(__name__)

INFRA_DIR = Path(__file__).resolve().parent

#: Services ``up`` starts when none are named.
DEFAULT_SERVICES = ("cassandra", "redis", "kafka")
#: Every service this module manages; ``flink`` starts only when asked for.
ALL_SERVICES = DEFAULT_SERVICES + ("flink",)

#: The Flink runner version assembled by infra/flink-pom.xml (see the pom for
#: why it is not BEAM_VERSION).
FLINK_RUNNER_BEAM_VERSION = "2.70.0"
FLINK_VERSION = "1.19"

# Pinned so resolution does not depend on whatever plugin version Maven's
# metadata calls "latest" today.
_MVN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MIN_JAVA = 17

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

# Seconds between SIGTERM and SIGKILL in `down`. Cassandra drains and
# Kafka does a controlled shutdown on SIGTERM; both usually take < 10 s.
_STOP_TIMEOUT_S = {"cassandra": 45.0, "kafka": 45.0, "redis": 10.0, "flink": 20.0}

# Popen handles of services started by this Python process, kept so that a
# service that dies while we are still running gets reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


# --------------------------------------------------------------------------
# Public data and small helpers
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` knows about one service.

    ``state`` is ``running`` (started by ``up``), ``external`` (answers on
    its port but was not started by ``up``; only Redis may be external) or
    ``stopped``. ``rss_mb`` is the resident memory of the process, when we
    know its pid.
    """

    name: str
    state: str
    pid: int | None
    port: int
    ready: bool
    rss_mb: float | None

    def line(self) -> str:
        """One human-readable line, as ``feedbeam infra status`` prints it."""
        pid = str(self.pid) if self.pid else "-"
        rss = f"{self.rss_mb:.0f} MiB" if self.rss_mb is not None else "-"
        ready = "ready" if self.ready else "not ready"
        return (f"{self.name:<10} {self.state:<8} pid {pid:<8} "
                f"port {self.port:<6} {ready:<10} rss {rss}")


def prism_binary(settings: StackSettings) -> Path:
    """Path of the Prism runner binary for BEAM_VERSION.

    Pipelines pass it as ``--prism_location`` so Beam does not try to
    download Prism from GitHub at run time (the network here reaches only
    package registries). Raises UserFacingError when it is not built yet.
    """
    path = _prism_path(settings)
    if not path.is_file():
        raise UserFacingError(
            f"the Prism runner binary is not built yet ({path}); "
            "run `feedbeam infra install` (needs Go)")
    return path


def flink_job_endpoint(settings: StackSettings) -> str:
    """``host:port`` of Beam's Flink job server, for ``--job_endpoint``."""
    return f"{settings.host}:{settings.flink_job_port}"


def kafka_ready(settings: StackSettings, timeout_s: float = 3.0) -> bool:
    """True when the broker answers a metadata request with itself in it."""
    if not _port_open(settings.host, settings.kafka_port):
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
    if not _port_open(settings.host, settings.cassandra_port):
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
    if not _port_open(settings.host, settings.redis_port):
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


def flink_ready(settings: StackSettings, timeout_s: float = 2.0) -> bool:
    """True when the job server's gRPC endpoint completes an HTTP/2 handshake."""
    if not _port_open(settings.host, settings.flink_job_port):
        return False
    import grpc

    channel = grpc.insecure_channel(flink_job_endpoint(settings))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


_READY: dict[str, Callable[[StackSettings], bool]] = {
    "kafka": kafka_ready,
    "cassandra": cassandra_ready,
    "redis": redis_ready,
    "flink": flink_ready,
}


def is_ready(settings: StackSettings, service: str) -> bool:
    """Run the readiness probe of one service by name."""
    return _READY[service](settings)


# --------------------------------------------------------------------------
# install / up / down / status
# --------------------------------------------------------------------------


def install(settings: StackSettings, services: Iterable[str] = ALL_SERVICES,
            *, prism: bool = True) -> None:
    """Fetch and build what ``services`` (and Prism) need; start nothing.

    Cheap when everything is cached: classpaths are reused while their pom
    is unchanged and every jar is still there. The three slow lanes run
    concurrently: Maven resolution, the Go build of Prism, and apt.
    """
    wanted = _check_names(services)
    _ensure_dirs(settings)
    # Check every missing tool before any lane starts, so a missing Go does
    # not surface only after minutes of Maven downloads.
    lanes: list[Callable[[], object]] = []
    maven = [name for name in ("cassandra", "kafka", "flink")
             if name in wanted and _cached_classpath(settings, name) is None]
    if any(name in wanted for name in ("cassandra", "kafka", "flink")):
        _require_java()
    if maven:
        _require_mvn()
        lanes.append(lambda: [_classpath(settings, name) for name in maven])
    if prism and not _prism_path(settings).is_file():
        _require_go()
        lanes.append(lambda: _ensure_prism(settings))
    if "redis" in wanted and not shutil.which("redis-server"):
        _require_apt()
        lanes.append(lambda: _ensure_redis_server(settings))
    if not lanes:
        return
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane) for lane in lanes]:
            future.result()  # re-raises the first lane's error


def up(settings: StackSettings, services: Iterable[str] | None = None,
       *, resolve_flink: bool = True) -> list[ServiceStatus]:
    """Start ``services`` (default: Cassandra, Kafka, Redis) and wait until ready.

    Idempotent: services already running from an earlier ``up`` are left
    alone, so a second call only re-runs the readiness probes. Installs
    whatever is missing first (including the Flink job server's classpath
    unless ``resolve_flink`` is False, so no run downloads later). Raises
    UserFacingError on a port held by a foreign process, a server that
    exits, or one that is not ready within ``settings.ready_timeout_s``.
    """
    wanted = _check_names(DEFAULT_SERVICES if services is None else services)
    to_install = set(wanted) | ({"flink"} if resolve_flink else set())
    install(settings, to_install)

    started: dict[str, float] = {}
    managed: set[str] = set()
    # Start order is ALL_SERVICES order: Cassandra first, as it is the
    # slowest to become ready; Redis next because it is instant; Kafka last
    # because formatting its storage on first start takes a few seconds.
    # All then become ready concurrently.
    for name in sorted(wanted, key=ALL_SERVICES.index):
        if _running_pid(settings, name) is not None:
            managed.add(name)
            continue
        if name == "redis" and redis_ready(settings):
            log.info("redis: using the Redis already answering on port %d "
                     "(not started by feedbeam, so `down` leaves it)",
                     settings.redis_port)
            continue
        _check_ports_free(settings, name)
        _START[name](settings)
        started[name] = time.monotonic()
        managed.add(name)

    _wait_ready(settings, wanted, started, managed)
    return status(settings, wanted)


def down(settings: StackSettings, services: Iterable[str] | None = None) -> list[str]:
    """Stop the services ``up`` started (all by default); return their names.

    SIGTERM first so Kafka and Cassandra shut down cleanly, SIGKILL after a
    per-service timeout. Services not started by ``up`` are never touched.
    """
    wanted = _check_names(ALL_SERVICES if services is None else services)
    targets = {name: pid for name in wanted
               if (pid := _running_pid(settings, name)) is not None}
    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        futures = {name: pool.submit(_stop, settings, name, pid)
                   for name, pid in targets.items()}
        for future in futures.values():
            future.result()
    return sorted(targets, key=ALL_SERVICES.index)


def status(settings: StackSettings,
           services: Iterable[str] | None = None) -> list[ServiceStatus]:
    """Current state of each service (all by default), probing readiness."""
    result = []
    for name in _check_names(ALL_SERVICES if services is None else services):
        pid = _running_pid(settings, name)
        ready = is_ready(settings, name)
        if pid is not None:
            state = "running"
        elif ready:
            state = "external"
        else:
            state = "stopped"
        result.append(ServiceStatus(
            name=name, state=state, pid=pid, port=_main_port(settings, name),
            ready=ready, rss_mb=_rss_mb(pid) if pid else None))
    return result


def log_path(settings: StackSettings, service: str) -> Path:
    """Where a service's stdout/stderr (its whole log) goes."""
    return settings.state_dir / "logs" / f"{service}.log"


# --------------------------------------------------------------------------
# Starting each server
# --------------------------------------------------------------------------


def _start_kafka(settings: StackSettings) -> None:
    home = settings.state_dir / "kafka"
    props = home / "server.properties"
    _render(INFRA_DIR / "kafka.properties", props, {
        "host": settings.host,
        "port": settings.kafka_port,
        "controller_port": settings.kafka_controller_port,
        "data_dir": home / "data",
    })
    classpath = _classpath(settings, "kafka")
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
        _run([_java(), "-Xmx256m", *common, "kafka.tools.StorageTool", "format",
              "--ignore-formatted", f"--cluster-id={cluster_id}", f"--config={props}"],
             log_path(settings, "kafka"), what="formatting Kafka storage")
    heap = settings.kafka_heap_mb
    _spawn(settings, "kafka", [
        _java(), f"-Xms{min(heap, 256)}m", f"-Xmx{heap}m", "-XX:+ExitOnOutOfMemoryError",
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
    classpath = _classpath(settings, "cassandra")
    jamm = next((p for p in classpath.split(os.pathsep)
                 if Path(p).name.startswith("jamm-")), None)
    heap = settings.cassandra_heap_mb
    cmd = [
        # A small initial heap keeps an idle dev node's RSS well below the
        # bound; -Xmx is the bound.
        _java(), f"-Xms{min(heap, 256)}m", f"-Xmx{heap}m", "-Xss256k",
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
    _spawn(settings, "cassandra", cmd)


def _start_redis(settings: StackSettings) -> None:
    home = settings.state_dir / "redis"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [
        _redis_server(), "--bind", settings.host, "--port", str(settings.redis_port),
        "--daemonize", "no", "--dir", str(home), "--logfile", "",
        # Append-only file, fsynced every second: a restart keeps the
        # materialized views; a crash loses at most the last second of
        # writes, which `feedbeam rebuild` restores from Cassandra. No RDB
        # snapshots (the AOF is the one copy on disk).
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--protected-mode", "yes",
    ]
    _spawn(settings, "redis", cmd)


def _start_flink(settings: StackSettings) -> None:
    classpath = _classpath(settings, "flink")
    cmd = [
        _java(), f"-Xmx{settings.flink_heap_mb}m", "-XX:+UseG1GC",
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
    _spawn(settings, "flink", cmd)


_START: dict[str, Callable[[StackSettings], None]] = {
    "kafka": _start_kafka,
    "cassandra": _start_cassandra,
    "redis": _start_redis,
    "flink": _start_flink,
}


def _main_port(settings: StackSettings, name: str) -> int:
    return {
        "kafka": settings.kafka_port,
        "cassandra": settings.cassandra_port,
        "redis": settings.redis_port,
        "flink": settings.flink_job_port,
    }[name]


def _all_ports(settings: StackSettings, name: str) -> list[int]:
    return {
        "kafka": [settings.kafka_port, settings.kafka_controller_port],
        "cassandra": [settings.cassandra_port, settings.cassandra_storage_port],
        "redis": [settings.redis_port],
        "flink": [settings.flink_job_port, settings.flink_artifact_port,
                  settings.flink_expansion_port],
    }[name]


# --------------------------------------------------------------------------
# Installing: Maven classpaths, Prism, redis-server
# --------------------------------------------------------------------------

_POMS = {
    "kafka": ("kafka-pom.xml", f"Apache Kafka {KAFKA_VERSION}"),
    "cassandra": ("cassandra-pom.xml", f"Apache Cassandra {CASSANDRA_VERSION}"),
    "flink": ("flink-pom.xml",
              f"Beam {FLINK_RUNNER_BEAM_VERSION} Flink {FLINK_VERSION} job server"),
}


def _classpath(settings: StackSettings, name: str) -> str:
    """The runtime classpath of ``infra/<name>-pom.xml``, resolved once.

    Cached in ``<cache_dir>/classpath`` under a key of the pom's content and
    the Maven repository path; reused while every jar on it still exists.
    """
    cached = _cached_classpath(settings, name)
    if cached is not None:
        return cached
    mvn = _require_mvn()
    pom_name, label = _POMS[name]
    pom = INFRA_DIR / pom_name
    cp_file = _classpath_file(settings, name)
    log.info("%s: resolving from Maven Central into %s (first time only)",
             label, settings.maven_repo)
    cp_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cp_file.with_suffix(".tmp")
    # -f points Maven at the pom; the project has no sources, so nothing is
    # written next to it. The local repository is our cache, not ~/.m2.
    _run([mvn, "-B", "-q", "-f", str(pom),
          f"-Dmaven.repo.local={settings.maven_repo}",
          f"{_MVN_DEPENDENCY_PLUGIN}:build-classpath",
          f"-Dmdep.outputFile={tmp}", "-Dmdep.includeScope=runtime"],
         settings.state_dir / "logs" / "install.log",
         what=f"resolving {label} with Maven")
    tmp.replace(cp_file)
    return cp_file.read_text().strip()


def _classpath_file(settings: StackSettings, name: str) -> Path:
    pom = INFRA_DIR / _POMS[name][0]
    key = hashlib.sha256(pom.read_bytes() + str(settings.maven_repo).encode()).hexdigest()
    return settings.cache_dir / "classpath" / f"{name}-{key[:16]}.txt"


def _cached_classpath(settings: StackSettings, name: str) -> str | None:
    cp_file = _classpath_file(settings, name)
    if not cp_file.is_file():
        return None
    classpath = cp_file.read_text().strip()
    if classpath and all(Path(p).is_file() for p in classpath.split(os.pathsep)):
        return classpath
    return None


def _prism_path(settings: StackSettings) -> Path:
    return settings.cache_dir / "prism" / f"v{BEAM_VERSION}" / "prism"


def _ensure_prism(settings: StackSettings) -> Path:
    path = _prism_path(settings)
    if path.is_file():
        return path
    go = _require_go()
    log.info("prism: building Beam %s Prism with `go install` "
             "(first time only, ~3 min)", BEAM_VERSION)
    env = dict(os.environ,
               GOBIN=str(path.parent),
               GOMODCACHE=str(settings.cache_dir / "go" / "mod"),
               GOCACHE=str(settings.cache_dir / "go" / "build"),
               # Go makes its module cache read-only; -modcacherw keeps the
               # cache dir removable with a plain rm -rf.
               GOFLAGS="-modcacherw")
    _run([go, "install",
          f"github.com/apache/beam/sdks/v2/go/cmd/prism@v{BEAM_VERSION}"],
         settings.state_dir / "logs" / "install.log",
         what="building Prism with go install", env=env, cwd=settings.cache_dir)
    # The module and build caches (~1.5 GiB) are only useful for rebuilding
    # this exact binary, and a Beam bump needs fresh modules anyway; keep
    # just the 64 MiB binary.
    for cache in ("mod", "build"):
        shutil.rmtree(settings.cache_dir / "go" / cache, ignore_errors=True)
    return path


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise UserFacingError(
            "redis-server is not installed; run `feedbeam infra install` "
            "or `apt-get install -y redis-server`")
    return found


def _ensure_redis_server(settings: StackSettings) -> None:
    if shutil.which("redis-server"):
        return
    apt = _require_apt()
    install_log = settings.state_dir / "logs" / "install.log"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("redis: `redis-server` not found; running apt-get update && "
             "apt-get install -y redis-server")
    _run([apt, "update"], install_log, what="apt-get update", env=env)
    _run([apt, "install", "-y", "--no-install-recommends", "redis-server"],
         install_log, what="apt-get install redis-server", env=env)


def _require_tool(name: str, how: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise UserFacingError(how)
    return found


def _require_mvn() -> str:
    return _require_tool(
        "mvn", "Maven (mvn) is needed to fetch Kafka, Cassandra and the Flink "
        "job server from Maven Central; install it with `apt-get install -y maven`")


def _require_go() -> str:
    return _require_tool(
        "go", "Go is needed to build Beam's Prism runner; install Go >= 1.21 "
        "from https://go.dev/dl and put it on PATH (Prism needs Go 1.26; an "
        "older go fetches that toolchain from the Go module proxy itself)")


def _require_apt() -> str:
    """apt-get, usable by us, for installing Debian's redis-server."""
    apt = _require_tool(
        "apt-get", "redis-server is missing and apt-get is not available; "
        "install Redis with your package manager so `redis-server` is on PATH")
    if os.geteuid() != 0:
        raise UserFacingError(
            "redis-server is missing; install it with "
            "`sudo apt-get update && sudo apt-get install -y redis-server`")
    return apt


def _java() -> str:
    return _require_java()


@functools.lru_cache(maxsize=1)
def _require_java() -> str:
    """The ``java`` on PATH, checked once per process to be Java 17+."""
    java = _require_tool(
        "java", f"a JDK {_MIN_JAVA} is needed to run Kafka and Cassandra; "
        "install it with `apt-get install -y openjdk-17-jdk-headless`")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    major = int(match.group(1)) if match else 0
    if major < _MIN_JAVA:
        raise UserFacingError(
            f"`{java}` is Java {major or 'of unknown version'}; Kafka "
            f"{KAFKA_VERSION} needs Java {_MIN_JAVA} (Cassandra "
            f"{CASSANDRA_VERSION} supports 17): install openjdk-17-jdk-headless "
            "and put it first on PATH")
    return java


# --------------------------------------------------------------------------
# Processes: spawn, pid files, readiness wait, stop
# --------------------------------------------------------------------------


def _ensure_dirs(settings: StackSettings) -> None:
    for sub in ("logs", "pids"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)


def _pid_file(settings: StackSettings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.pid"


def _spawn(settings: StackSettings, name: str, cmd: list[str]) -> int:
    """Start ``cmd`` detached (own session), logging to the service log."""
    path = log_path(settings, name)
    with open(path, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n==== feedbeam: starting {name} at {stamp}\n"
                  f"==== {subprocess.list2cmdline(cmd)}\n".encode())
        out.flush()
        # Own session: the server survives the CLI exiting, ignores the
        # terminal's Ctrl-C, and `down` can signal its whole process group.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=settings.state_dir,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    # The start time guards against signalling a recycled pid later.
    _pid_file(settings, name).write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")
    log.info("%s: started, pid %d, log %s", name, proc.pid, path)
    return proc.pid


def _running_pid(settings: StackSettings, name: str) -> int | None:
    """Pid of the live process ``up`` started for ``name``; clears stale files."""
    path = _pid_file(settings, name)
    try:
        pid_text, ticks = path.read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
    if _start_ticks(pid) != ticks:
        log.debug("%s: removing stale pid file %s", name, path)
        path.unlink(missing_ok=True)
        return None
    return pid


def _start_ticks(pid: int) -> str | None:
    """Process start time (clock ticks since boot) or None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces; fields are counted after it.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_ports_free(settings: StackSettings, name: str) -> None:
    for port in _all_ports(settings, name):
        if _port_open(settings.host, port):
            env = f"FEEDBEAM_{name.upper()}_PORT" if port == _main_port(settings, name) \
                else "the FEEDBEAM_*_PORT variables"
            raise UserFacingError(
                f"port {settings.host}:{port} needed by {name} is taken by a "
                f"process feedbeam did not start (see `ss -ltnp 'sport = :{port}'`); "
                f"stop it, or move {name} with {env}")


def _wait_ready(settings: StackSettings, wanted: list[str],
                started: dict[str, float], managed: set[str]) -> None:
    """Poll every service until ready; fail fast if one of ours exits.

    ``started`` maps the services this call started to their start time,
    ``managed`` names every service with a pid file of ours.
    """
    t0 = time.monotonic()
    deadline = t0 + settings.ready_timeout_s
    pending = list(wanted)
    progress = _Progress()
    while pending:
        for name in list(pending):
            if name in managed and _running_pid(settings, name) is None:
                progress.done()
                raise UserFacingError(
                    f"{name} exited before it was ready; read "
                    f"{log_path(settings, name)}:\n{_tail(log_path(settings, name), 15)}")
            if is_ready(settings, name):
                pending.remove(name)
                if name in started:
                    progress.note(f"{name}: ready after "
                                  f"{time.monotonic() - started[name]:.1f} s")
        if not pending:
            break
        if time.monotonic() > deadline:
            progress.done()
            logs = ", ".join(str(log_path(settings, n)) for n in pending)
            raise UserFacingError(
                f"not ready after {settings.ready_timeout_s:.0f} s: "
                f"{', '.join(pending)}; read {logs} (they are left running; "
                "`feedbeam infra down` stops them)")
        progress.update(f"waiting for {', '.join(pending)}: "
                        f"{time.monotonic() - t0:.0f} s")
        time.sleep(0.5)
    progress.done()


def _stop(settings: StackSettings, name: str, pid: int) -> None:
    timeout = _STOP_TIMEOUT_S[name]
    log.info("%s: stopping pid %d (SIGTERM, SIGKILL after %.0f s)", name, pid, timeout)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running_pid(settings, name) is not None:
        if time.monotonic() > deadline:
            log.warning("%s: still running after %.0f s; sending SIGKILL", name, timeout)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _running_pid(settings, name) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            break
        time.sleep(0.2)
    _pid_file(settings, name).unlink(missing_ok=True)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.poll()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        # We started it as a session leader, so its group id is its pid;
        # signalling the group also reaches any helper processes it forked.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _Progress:
    """An elapsed-time line: rewritten in place on a terminal, else every 10 s."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._width = 0

    def update(self, text: str) -> None:
        if self._tty:
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)
        elif time.monotonic() - self._last >= 10:
            self._last = time.monotonic()
            log.info("%s", text)

    def note(self, text: str) -> None:
        self.done()
        log.info("%s", text)

    def done(self) -> None:
        if self._tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------


def _check_names(services: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(services))
    unknown = [n for n in names if n not in ALL_SERVICES]
    if unknown:
        raise UserFacingError(
            f"unknown service {', '.join(unknown)}; choose from {', '.join(ALL_SERVICES)}")
    return names


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


def _run(cmd: list[str], log_file: Path, *, what: str,
         env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a one-off command, appending its output to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        out.write(f"\n==== {subprocess.list2cmdline(cmd)}\n".encode())
        out.flush()
        code = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if code != 0:
        raise UserFacingError(
            f"{what} failed (exit {code}); read {log_file}:\n{_tail(log_file, 20)}")


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``feedbeam infra ...`` to the CLI."""
    parser = subparsers.add_parser(
        "infra", help="install, start and stop the local Kafka/Cassandra/Redis stack",
        description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("install", help="fetch and build everything, start nothing")
    p.set_defaults(handler=_cmd_install)

    p = actions.add_parser(
        "up", help="start services (default: cassandra kafka redis) and wait until ready")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help=f"any of {', '.join(ALL_SERVICES)}")
    p.add_argument("--with-flink", action="store_true",
                   help="also start Beam's Flink job server (~1 GiB)")
    p.set_defaults(handler=_cmd_up)

    p = actions.add_parser("down", help="stop the services `up` started")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help="default: every service `up` started")
    p.set_defaults(handler=_cmd_down)

    p = actions.add_parser("status", help="one line per service")
    p.set_defaults(handler=_cmd_status)

    p = actions.add_parser("logs", help="print (or follow) a service's log")
    p.add_argument("service", choices=[*ALL_SERVICES, "install"])
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(handler=_cmd_logs)


def _cmd_install(args, settings: StackSettings) -> int:
    install(settings)
    print(f"installed; Prism at {prism_binary(settings)}")
    return 0


def _cmd_up(args, settings: StackSettings) -> int:
    services = list(args.services) or list(DEFAULT_SERVICES)
    if args.with_flink and "flink" not in services:
        services.append("flink")
    t0 = time.monotonic()
    for line in up(settings, services):
        print(line.line())
    print(f"stack up in {time.monotonic() - t0:.1f} s; "
          f"Prism: {prism_binary(settings)}")
    return 0


def _cmd_down(args, settings: StackSettings) -> int:
    stopped = down(settings, args.services or None)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing (none running)"))
    return 0


def _cmd_status(args, settings: StackSettings) -> int:
    for line in status(settings):
        print(line.line())
    prism = _prism_path(settings)
    print(f"{'prism':<10} {'built' if prism.is_file() else 'missing':<8} {prism}")
    return 0


def _cmd_logs(args, settings: StackSettings) -> int:
    path = (settings.state_dir / "logs" / "install.log" if args.service == "install"
            else log_path(settings, args.service))
    if not path.exists():
        raise UserFacingError(f"no log yet at {path}; has `feedbeam infra up` run?")
    print(_tail(path, args.lines))
    if args.follow:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                while True:
                    chunk = f.read()
                    if chunk:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                    else:
                        time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
