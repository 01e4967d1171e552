"""The ``feedbeam`` command line.

Each subcommand lives in its own module, which exposes
``register(subparsers)``; the module adds its parser and sets ``handler`` to
a function ``(args, settings) -> int``. Environment variables are read here,
once, into ``StackSettings``. Every parser is a ``CliParser``: one name per
option across the commands (``SPELLINGS``), dashes or underscores alike.
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
    "jobs.clean",
    "jobs.rebuild",
    "jobs.serve",
    "jobs.train",
)


#: Older names of an option -> the one name every command uses for it (the
#: pipelines' name, dashed). Both are accepted; help shows the new one.
SPELLINGS = {
    "--prefix": "--topic-prefix",
    "--group": "--consumer-group",
    "--key-prefix": "--redis-key-prefix",
    "--keyspace": "--cassandra-keyspace",
    "--bootstrap": "--kafka-bootstrap",
}


def spellings(names: tuple[str, ...]) -> list[str]:
    """Every spelling of the option ``names``: its one name first (``SPELLINGS``), then
    the names given, then the underscore twin of each dashed one."""
    out = [SPELLINGS[n] for n in names if n in SPELLINGS] + list(names)
    out += ["--" + n[2:].replace("-", "_") for n in out if n.startswith("--")]
    return list(dict.fromkeys(out))


class _Formatter(argparse.HelpFormatter):
    """Shows each option by its one name only."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = [n for n in action.option_strings if not n.startswith("--")]
        names += [n for n in action.option_strings if n.startswith("--")][:1]
        if action.nargs == 0:
            return ", ".join(names)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{n} {metavar}" for n in names)


class _SpelledGroup:
    """An argument group whose options get every spelling too."""

    def __init__(self, group):
        self._group = group

    def add_argument(self, *names, **kwargs):
        return self._group.add_argument(*_spelled(names, kwargs), **kwargs)

    def __getattr__(self, name):
        return getattr(self._group, name)


def _spelled(names: tuple[str, ...], kwargs: dict) -> list[str]:
    if not names or not names[0].startswith("-"):
        return list(names)  # a positional
    first = next((n for n in names if n.startswith("--")), None)
    if first is not None:  # keep the attribute the command reads
        kwargs.setdefault("dest", first[2:].replace("-", "_"))
    return spellings(names)


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (also of every subcommand) that accepts each option under all
    its spellings (``spellings``) and shows it by its one name."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*_spelled(names, kwargs), **kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _SpelledGroup(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return _SpelledGroup(super().add_mutually_exclusive_group(**kwargs))


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="feedbeam",
        description="Streaming feed materialization on Apache Beam.",
        epilog="Options take dashes or underscores (--topic-prefix or --topic_prefix); older "
               "names (" + ", ".join(SPELLINGS) + ") still work. A run is isolated by "
               "--topic-prefix, --consumer-group, --redis-key-prefix and --cassandra-keyspace, "
               "the same four options in submit, status, cancel and clean.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _not_beam_gcp_notice(record: logging.LogRecord) -> bool:
    """False for the warning Beam's BigQuery client logs on the root logger when
    apitools is absent: feedbeam never uses BigQuery."""
    return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


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
        # Importing Beam options logs optional GCP extras it cannot find; one of
        # them on the root logger, so only a filter keeps it off the screen.
        logging.getLogger("apache_beam.io.gcp").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_beam_gcp_notice)
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
