"""The local stack: Kafka, Cassandra, Redis and the Prism job server on loopback, plus Flink.

``feedbeam infra ...``, registered by ``jobs.cli``::

    feedbeam infra install             # fetch/build everything, start nothing
    feedbeam infra up [--with-flink]   # install if needed, start, wait until ready
    feedbeam infra up flink            # start only Beam's Flink job server
    feedbeam infra up --topology cluster   # Redis Cluster, 2 Cassandra nodes, Flink
                                           # session cluster (infra.cluster), beside it
    feedbeam infra status              # one line per service
    feedbeam infra logs kafka -n 100 -f
    feedbeam infra down                # stop what `up` started
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from infra import cluster, install, processes, stack
from infra.errors import UserFacingError
from infra.services import ALL_SERVICES
from infra.settings import TOPOLOGIES, StackSettings


def _add_topology(parser) -> None:
    parser.add_argument(
        "--topology", choices=TOPOLOGIES, default=None,
        help="single (default; or FEEDBEAM_TOPOLOGY) or cluster: Redis Cluster, "
             "2 Cassandra nodes, Flink session cluster, beside the single stack")


def _topology(args, settings: StackSettings) -> StackSettings:
    if args.topology is None:
        return settings
    return dataclasses.replace(settings, topology=args.topology)


def register(subparsers) -> None:
    """Add ``feedbeam infra ...`` to the CLI."""
    parser = subparsers.add_parser(
        "infra", help="install, start and stop the local Kafka/Cassandra/Redis/Prism stack",
        description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("install", help="fetch and build everything, start nothing")
    p.set_defaults(handler=_cmd_install)

    p = actions.add_parser(
        "up", help="start services (default: cassandra redis kafka prism) and wait until ready")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help=f"any of {', '.join(stack.EVERY_SERVICE)}")
    p.add_argument("--with-flink", action="store_true",
                   help="also start Beam's Flink job server (~1 GiB)")
    _add_topology(p)
    p.set_defaults(handler=_cmd_up)

    p = actions.add_parser("down", help="stop the services `up` started")
    p.add_argument("services", nargs="*", metavar="SERVICE",
                   help="default: every service of the topology `up` started")
    _add_topology(p)
    p.set_defaults(handler=_cmd_down)

    p = actions.add_parser("status", help="one line per service")
    _add_topology(p)
    p.set_defaults(handler=_cmd_status)

    p = actions.add_parser("logs", help="print (or follow) a service's log")
    p.add_argument("service", choices=[*stack.EVERY_SERVICE, "install"])
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(handler=_cmd_logs)


def _cmd_install(args, settings: StackSettings) -> int:
    install.install(settings, [*ALL_SERVICES, "flink-cluster"])
    print(f"installed; Prism at {install.prism_binary(settings)}")
    return 0


def _cmd_up(args, settings: StackSettings) -> int:
    settings = _topology(args, settings)
    services = list(args.services) or list(stack.topology_services(settings))
    if args.with_flink and "flink" not in services:
        services.append("flink")
    t0 = time.monotonic()
    for line in stack.up(settings, services):
        print(line.line())
    if settings.clustered:
        print(f"cluster up in {time.monotonic() - t0:.1f} s; {_cluster_line(settings)}")
        return 0
    print(f"stack up in {time.monotonic() - t0:.1f} s; "
          f"Prism: {install.prism_binary(settings)}")
    return 0


def _cluster_line(settings: StackSettings) -> str:
    """Where clients of the cluster topology connect, and the Redis Cluster's state."""
    state = "ok" if cluster.redis_cluster_ok(settings) else "not ok"
    return (f"redis {settings.redis_url} (cluster state {state}), cassandra "
            f"{','.join(cluster.cassandra_hosts(settings))}:{settings.cassandra_port}, "
            f"flink job endpoint {cluster.job_endpoint(settings)} -> "
            f"{cluster.flink_master(settings)}; FEEDBEAM_TOPOLOGY=cluster points the CLI there")


def _cmd_down(args, settings: StackSettings) -> int:
    stopped = stack.down(_topology(args, settings), args.services or None)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing (none running)"))
    return 0


def _cmd_status(args, settings: StackSettings) -> int:
    settings = _topology(args, settings)
    for line in stack.status(settings):
        print(line.line())
    if settings.clustered:
        print(_cluster_line(settings))
        return 0
    prism = install.prism_path(settings)
    print(f"{'':<10} {'built' if prism.is_file() else 'missing':<8} {prism}")
    return 0


def _cmd_logs(args, settings: StackSettings) -> int:
    path = (processes.install_log_path(settings) if args.service == "install"
            else processes.log_path(settings, args.service))
    if not path.exists():
        raise UserFacingError(f"no log yet at {path}; has `feedbeam infra up` run?")
    print(processes.tail(path, args.lines))
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
