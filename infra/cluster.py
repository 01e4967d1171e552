"""The cluster topology: the same product's servers as clusters, on loopback, beside the single stack.

    feedbeam infra up --topology cluster      # or FEEDBEAM_TOPOLOGY=cluster
    feedbeam infra status --topology cluster
    feedbeam infra down --topology cluster    # leaves the single stack (and Kafka) alone

* ``redis-node1..3``: a Redis Cluster of ``CLUSTER_REDIS_NODES`` masters (Debian's
  ``redis-server --cluster-enabled yes``) on ports from ``cluster_redis_port``,
  joined once by ``redis-cli --cluster create`` (``form_redis_cluster``).
* ``cassandra-node1..2``: ``CLUSTER_CASSANDRA_NODES`` Cassandra nodes on the
  loopback addresses from ``cluster_cassandra_host`` (all seeds, one token
  each, an even split of the ring), the single node's classpath.
* ``flink-jobmanager``, ``flink-taskmanager1..2``: a Flink session cluster from
  ``infra/flink-cluster-pom.xml``, configured by ``infra/flink-cluster.yaml``.
* ``flink-jobserver``: Beam's Flink job server submitting to that JobManager
  (``--flink-master host:cluster_flink_rest_port``) instead of a mini-cluster.

Kafka is the single stack's broker in both topologies. The interface mirrors
``infra.services`` (``main_port``, ``check_ports_free``, ``is_ready``,
``start``, ``STOP_TIMEOUT_S``); ``infra.stack`` picks the module by name.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import time
import urllib.error
import urllib.request

from infra import install, processes, services
from infra.errors import UserFacingError
from infra.install import INFRA_DIR
from infra.settings import (
    CLUSTER_CASSANDRA_NODES,
    CLUSTER_REDIS_NODES,
    CLUSTER_TASKMANAGERS,
    StackSettings,
)

log = logging.getLogger(__name__)

REDIS_NODES = tuple(f"redis-node{i}" for i in range(1, CLUSTER_REDIS_NODES + 1))
CASSANDRA_NODES = tuple(f"cassandra-node{i}" for i in range(1, CLUSTER_CASSANDRA_NODES + 1))
TASKMANAGERS = tuple(f"flink-taskmanager{i}" for i in range(1, CLUSTER_TASKMANAGERS + 1))
#: The cluster topology's own services, in start order (slowest first).
CLUSTER_SERVICES = (*CASSANDRA_NODES, *REDIS_NODES, "flink-jobmanager", *TASKMANAGERS,
                    "flink-jobserver")
#: The single stack's services the cluster topology uses too.
SHARED_SERVICES = ("kafka",)

STOP_TIMEOUT_S = {**{n: 45.0 for n in CASSANDRA_NODES}, **{n: 10.0 for n in REDIS_NODES},
                  "flink-jobmanager": 20.0, **{n: 20.0 for n in TASKMANAGERS},
                  "flink-jobserver": 20.0}

#: Murmur3's ring runs from -2**63 to 2**63 - 1; one token per node splits it evenly.
_RING = 2 ** 64


def _index(name: str) -> int:
    """``redis-node2`` -> 1."""
    return int(name[len(name.rstrip("0123456789")):]) - 1


def redis_node_port(settings: StackSettings, name: str) -> int:
    return settings.cluster_redis_port + _index(name)


def cassandra_node_host(settings: StackSettings, name: str) -> str:
    return str(ipaddress.ip_address(settings.cluster_cassandra_host) + _index(name))


def cassandra_hosts(settings: StackSettings) -> list[str]:
    """Every node's address: the contact points of a client that wants them all."""
    return [cassandra_node_host(settings, n) for n in CASSANDRA_NODES]


def flink_master(settings: StackSettings) -> str:
    """The JobManager's REST address, as Beam's ``--flink-master`` takes it."""
    return f"{settings.host}:{settings.cluster_flink_rest_port}"


def job_endpoint(settings: StackSettings) -> str:
    """``host:port`` of the job server that submits to the session cluster."""
    return f"{settings.host}:{settings.cluster_flink_job_port}"


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------


def main_port(settings: StackSettings, name: str) -> int:
    if name in REDIS_NODES:
        return redis_node_port(settings, name)
    if name in CASSANDRA_NODES:
        return settings.cassandra_port
    return {"flink-jobmanager": settings.cluster_flink_rest_port,
            "flink-jobserver": settings.cluster_flink_job_port}.get(name, 0)


def _addresses(settings: StackSettings, name: str) -> list[tuple[str, int]]:
    h = settings.host
    if name in REDIS_NODES:
        return [(h, redis_node_port(settings, name))]
    if name in CASSANDRA_NODES:
        host = cassandra_node_host(settings, name)
        return [(host, settings.cassandra_port), (host, settings.cassandra_storage_port)]
    if name == "flink-jobmanager":
        return [(h, settings.cluster_flink_rest_port), (h, settings.cluster_flink_rpc_port),
                (h, settings.cluster_flink_blob_port)]
    if name == "flink-jobserver":
        return [(h, settings.cluster_flink_job_port), (h, settings.cluster_flink_artifact_port),
                (h, settings.cluster_flink_expansion_port)]
    return []  # TaskManagers listen on ports the OS picks


def check_ports_free(settings: StackSettings, name: str) -> None:
    """UserFacingError if an address ``name`` listens on is already taken."""
    for host, port in _addresses(settings, name):
        if processes.port_open(host, port):
            raise UserFacingError(
                f"{host}:{port} needed by {name} (cluster topology) is taken by a process "
                f"feedbeam did not start (see `ss -ltnp 'sport = :{port}'`); stop it, or "
                "move the cluster with the FEEDBEAM_CLUSTER_* variables")


# --------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------


def _redis_node_ready(settings: StackSettings, name: str) -> bool:
    return _redis_call(settings, redis_node_port(settings, name), "PING") is not None


def _redis_call(settings: StackSettings, port: int, *command: str):
    """One command's reply from one node, None when it does not answer."""
    import redis

    client = redis.Redis(host=settings.host, port=port, socket_timeout=2.0,
                         socket_connect_timeout=1.0)
    try:
        return client.execute_command(*command)
    except redis.RedisError:
        return None
    finally:
        client.close()


def _cluster_info(settings: StackSettings, port: int) -> dict[str, str]:
    reply = _redis_call(settings, port, "CLUSTER", "INFO")
    if reply is None:
        return {}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def redis_cluster_ok(settings: StackSettings) -> bool:
    """True when every node says ``cluster_state:ok`` with all 16384 slots assigned."""
    for name in REDIS_NODES:
        info = _cluster_info(settings, redis_node_port(settings, name))
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != "16384":
            return False
    return True


def _cassandra_node_ready(settings: StackSettings, name: str) -> bool:
    # Ready when it also gossips with every other node: before that a
    # LOCAL_QUORUM write at replication factor 2 cannot succeed.
    return services.cassandra_node_ready(cassandra_node_host(settings, name),
                                         settings.cassandra_port,
                                         peers=CLUSTER_CASSANDRA_NODES - 1)


def flink_rest(settings: StackSettings, path: str, timeout_s: float = 2.0) -> dict | None:
    """The JobManager's REST answer to GET ``path`` (JSON), None when it does not answer."""
    url = f"http://{flink_master(settings)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def registered_taskmanagers(settings: StackSettings) -> list[str]:
    """Resource ids of the TaskManagers the JobManager knows now."""
    answer = flink_rest(settings, "/taskmanagers") or {}
    return [tm["id"] for tm in answer.get("taskmanagers", [])]


def _ready(settings: StackSettings, name: str) -> bool:
    if name in REDIS_NODES:
        return _redis_node_ready(settings, name)
    if name in CASSANDRA_NODES:
        return _cassandra_node_ready(settings, name)
    if name == "flink-jobmanager":
        return flink_rest(settings, "/overview") is not None
    if name in TASKMANAGERS:
        return name in registered_taskmanagers(settings)
    if name == "flink-jobserver":
        return services.grpc_ready(settings.host, settings.cluster_flink_job_port, 2.0)
    raise KeyError(name)


def is_ready(settings: StackSettings, name: str) -> bool:
    """Run the readiness probe of one cluster service by name."""
    return _ready(settings, name)


# --------------------------------------------------------------------------
# Starting
# --------------------------------------------------------------------------


def _home(settings: StackSettings, name: str):
    return settings.state_dir / "cluster" / name


def start(settings: StackSettings, name: str) -> None:
    """Render the config of ``name`` and spawn it; returns at once (not ready yet)."""
    if name in REDIS_NODES:
        _start_redis_node(settings, name)
    elif name in CASSANDRA_NODES:
        _start_cassandra_node(settings, name)
    elif name == "flink-jobmanager" or name in TASKMANAGERS:
        _start_flink_process(settings, name)
    elif name == "flink-jobserver":
        _start_job_server(settings)
    else:
        raise KeyError(name)


def _start_redis_node(settings: StackSettings, name: str) -> None:
    home = _home(settings, name)
    home.mkdir(parents=True, exist_ok=True)
    processes.spawn(settings, name, [
        install.redis_server(), "--bind", settings.host,
        "--port", str(redis_node_port(settings, name)),
        "--daemonize", "no", "--dir", str(home), "--logfile", "",
        # The node's view of the cluster (ids, slots) lives in nodes.conf in
        # its own dir, so a restarted node rejoins with its slots.
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "5000",
        # As the single Redis: append-only file fsynced every second.
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--protected-mode", "yes",
    ])


def form_redis_cluster(settings: StackSettings, timeout_s: float = 60.0) -> None:
    """Join the Redis nodes into one cluster (once; a formed cluster is left as it is)
    and wait until every node reports ``cluster_state:ok``."""
    if redis_cluster_ok(settings):
        return
    infos = [_cluster_info(settings, redis_node_port(settings, n)) for n in REDIS_NODES]
    if all(i.get("cluster_known_nodes") == "1" and i.get("cluster_slots_assigned") == "0"
           for i in infos):
        cli = shutil.which("redis-cli")
        if cli is None:
            raise UserFacingError("redis-cli is needed to create the Redis Cluster; it comes "
                                  "with redis-server: `apt-get install -y redis-tools`")
        nodes = [f"{settings.host}:{redis_node_port(settings, n)}" for n in REDIS_NODES]
        log.info("redis cluster: creating it from %s (3 masters, no replicas)", " ".join(nodes))
        processes.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0",
                       "--cluster-yes"],
                      processes.log_path(settings, REDIS_NODES[0]),
                      what="redis-cli --cluster create")
    deadline = time.monotonic() + timeout_s
    while not redis_cluster_ok(settings):
        if time.monotonic() > deadline:
            raise UserFacingError(
                f"the Redis Cluster is not ok after {timeout_s:.0f} s (a node holds another "
                f"cluster's nodes.conf?); read {processes.log_path(settings, REDIS_NODES[0])}, "
                f"or stop it and remove {settings.state_dir / 'cluster'}/redis-node* to "
                "start afresh")
        time.sleep(0.5)


def _start_cassandra_node(settings: StackSettings, name: str) -> None:
    home = _home(settings, name)
    config = home / "cassandra.yaml"
    seeds = ",".join(f"{h}:{settings.cassandra_storage_port}" for h in cassandra_hosts(settings))
    services.render(INFRA_DIR / "cassandra.yaml", config, {
        "cluster_name": "feedbeam-cluster",
        "initial_token": -2 ** 63 + _index(name) * (_RING // CLUSTER_CASSANDRA_NODES),
        "seeds": seeds,
        "host": cassandra_node_host(settings, name),
        "port": settings.cassandra_port,
        "storage_port": settings.cassandra_storage_port,
        "data_dir": home,
    })
    # A ring delay of seconds, not the single node's 100 ms: gossip drops a peer
    # that has not announced its token within the delay (a "fat client"), and
    # nodes starting side by side on two busy cores take longer than that.
    processes.spawn(settings, name, services.cassandra_command(
        settings, home, config, settings.cluster_cassandra_heap_mb, home / "logs",
        ring_delay_ms=10_000))


def _flink_conf(settings: StackSettings, name: str):
    """Render ``infra/flink-cluster.yaml`` for process ``name``; returns its conf dir."""
    home = _home(settings, name)
    conf = home / "conf"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    services.render(INFRA_DIR / "flink-cluster.yaml", conf / "flink-conf.yaml", {
        "host": settings.host,
        "rpc_port": settings.cluster_flink_rpc_port,
        "blob_port": settings.cluster_flink_blob_port,
        "rest_port": settings.cluster_flink_rest_port,
        "tmp_dir": home / "tmp",
        "resource_id": name,
        "slots": settings.cluster_taskmanager_slots,
        "metaspace_mb": _TM_METASPACE_MB,
        "task_heap_mb": settings.cluster_taskmanager_heap_mb - _TM_FRAMEWORK_HEAP_MB,
    })
    return conf


#: ``taskmanager.memory.framework.heap.size`` and the direct memory (framework
#: off-heap + network) of ``infra/flink-cluster.yaml``.
_TM_FRAMEWORK_HEAP_MB = 128
_TM_DIRECT_MB = 128 + 64
#: Metaspace of a TaskManager. Beam's classes are loaded once, from its classpath
#: (parent-first, ``infra/flink-cluster.yaml``): 78-80 MiB used with the four jobs
#: running and after they ended (``jcmd PID VM.metaspace``). Loaded per job from its
#: jar instead, they took 178 MiB for four jobs, and 578 MiB with none running after
#: a few benchmark runs (ended jobs' class loaders never freed) before the JVM ended.
_TM_METASPACE_MB = 256


def _start_flink_process(settings: StackSettings, name: str) -> None:
    conf = _flink_conf(settings, name)
    if name == "flink-jobmanager":
        heap = settings.cluster_jobmanager_heap_mb
        memory = [f"-Xms{heap}m", f"-Xmx{heap}m"]
        main = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
    else:
        heap = settings.cluster_taskmanager_heap_mb
        memory = [f"-Xms{heap}m", f"-Xmx{heap}m", f"-XX:MaxDirectMemorySize={_TM_DIRECT_MB}m",
                  f"-XX:MaxMetaspaceSize={_TM_METASPACE_MB}m"]
        main = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
    processes.spawn(settings, name, [
        install.java(), *memory, "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError",
        *services.FLINK_JVM17_OPTS,
        "-Dorg.slf4j.simpleLogger.showDateTime=true",
        # Beam's Flink runner on the cluster's own classpath too, loaded parent-first
        # (flink-cluster.yaml): every job shares one copy of its classes.
        "-cp", install.classpath(settings, "flink-cluster") + ":"
        + install.classpath(settings, "flink"),
        main, "--configDir", str(conf),
    ])


def _start_job_server(settings: StackSettings) -> None:
    # Its Flink client reads the same conf (the REST client's content limit).
    conf = _flink_conf(settings, "flink-jobserver")
    processes.spawn(settings, "flink-jobserver", services.flink_job_server_command(
        settings, flink_master(settings), settings.cluster_flink_job_port,
        settings.cluster_flink_artifact_port, settings.cluster_flink_expansion_port,
        settings.cluster_jobserver_heap_mb, conf))
