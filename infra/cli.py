"""The local stack: Kafka, Cassandra, Redis and the Prism job server on loopback, plus Flink.

``feedbeam infra ...``, registered by ``jobs.cli``::

    feedbeam infra install             # fetch/build everything, start nothing
    feedbeam infra up [--with-flink]   # install if needed, start, wait until ready
    feedbeam infra up flink            # start only Beam's Flink job server
    feedbeam infra status              # one line per service
    feedbeam infra logs kafka -n 100 -f
    feedbeam infra down                # stop what `up` started
"""
from __future__ import annotations

import os
import sys
import time

from infra import install, processes, stack
from infra.errors import UserFacingError
from infra.services import ALL_SERVICES, DEFAULT_SERVICES
from infra.settings import StackSettings


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
    install.install(settings, ALL_SERVICES)
    print(f"installed; Prism at {install.prism_binary(settings)}")
    return 0


def _cmd_up(args, settings: StackSettings) -> int:
    services = list(args.services) or list(DEFAULT_SERVICES)
    if args.with_flink and "flink" not in services:
        services.append("flink")
    t0 = time.monotonic()
    for line in stack.up(settings, services):
        print(line.line())
    print(f"stack up in {time.monotonic() - t0:.1f} s; "
          f"Prism: {install.prism_binary(settings)}")
    return 0


def _cmd_down(args, settings: StackSettings) -> int:
    stopped = stack.down(settings, args.services or None)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing (none running)"))
    return 0


def _cmd_status(args, settings: StackSettings) -> int:
    for line in stack.status(settings):
        print(line.line())
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
