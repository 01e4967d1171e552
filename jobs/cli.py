"""The ``feedbeam`` command line.

Each subcommand lives in its own module, which exposes
``register(subparsers)``; the module adds its parser and sets ``handler`` to
a function ``(args, settings) -> int``. Environment variables are read here,
once, into ``StackSettings``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from infra.settings import StackSettings
from infra.errors import UserFacingError

# Modules that contribute subcommands, in the order ``--help`` lists them.
_COMMAND_MODULES = (
    "infra.cli",
    "jobs.topics",
    "jobs.migrate",
    "jobs.generate",
    "jobs.demo",
    "jobs.replay",
    "jobs.submit",
    "jobs.rebuild",
    "jobs.serve",
    "jobs.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedbeam",
        description="Streaming feed materialization on Apache Beam.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # The Cassandra driver logs routine connection details at INFO.
        logging.getLogger("cassandra").setLevel(logging.WARNING)
        # Importing Beam options logs optional GCP extras it cannot find.
        logging.getLogger("apache_beam.io.gcp").setLevel(logging.WARNING)
    try:
        try:
            settings = StackSettings.from_env()
        except ValueError as exc:
            raise UserFacingError(str(exc)) from None
        return int(args.handler(args, settings) or 0)
    except UserFacingError as exc:
        print(f"feedbeam: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly, like other CLIs.
        sys.stderr.close()
        return 141
    except KeyboardInterrupt:
        print("feedbeam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
