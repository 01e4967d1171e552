"""Running a pipeline: its command line; wait, and cancel cleanly on SIGTERM/Ctrl-C.

    result = run_until_done(pipeline)

A streaming job submitted by ``python -m pipelines.<name>`` runs until it is
stopped. With the LOOPBACK environment the submitting process hosts the SDK
workers, so if that process simply died, the job would stay RUNNING on the
runner without workers (on Flink it keeps its task slots and restarts
forever). So a SIGTERM or SIGINT asks the runner to cancel the job and waits
until the runner reports it ended (or ``cancel_timeout_s`` passes) before the
process exits. ``feedbeam cancel`` sends that SIGTERM.

    options = pipeline_options(argv)   # what every pipeline's run() parses

``pipeline_options`` adds what a runner needs for our Kafka source to work
(``runner_flags``): on Flink with ``--checkpointing_interval``, the flag
``--finish_bundle_before_checkpointing``. Without it Beam's Flink runner
(2.70) finishes a bundle that is open when a checkpoint starts with its
output held in the operator's checkpointed buffer, and emits that buffer
only when the operator next starts a bundle (an element, a watermark or a
timer). The steps before the source's read (Impulse, partition listing,
restriction pairing) see their few elements once and the Impulse never
advances its watermark while checkpointing keeps it alive: the partitions
stay in the buffer, the read never starts, nothing is emitted and no offset
is committed. Finishing the bundle before the barrier flushes it instead;
its finalization (the offset commit) then runs when the checkpoint completes.

    args = check_options(module, argv).args   # before anything starts
    print(options_help(module, "python -m pipelines.fanout"))

The command-line section: the options a pipeline reads are those of the
``PipelineOptions`` classes its module imports (its own, ``StoreOptions``,
``KafkaReadOptions``...), Beam's registered classes, and on Flink the runner's
own, which its job server lists. ``check_options`` refuses anything else,
naming the nearest known option; ``--topic-prefix`` is read as
``--topic_prefix``. Why: docs/operations.md#options-one-spelling-typos-refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


def has_flag(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def flag_value(args: list[str], name: str) -> str | None:
    """The value of option ``name`` in ``args`` (``--x=v`` or ``--x v``); the last one
    wins, as argparse reads it."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def runner_name(args: list[str]) -> str:
    """``--runner`` in ``args``, lower case and without ``Runner``: ``flink``, ``prism``..."""
    return (flag_value(args, "--runner") or "").lower().removesuffix("runner")


#: Flink restarts a failed job this many times, this far apart, then fails it. With
#: checkpointing and no restart strategy Flink restarts forever, and a LOOPBACK job
#: whose launcher died can never come back: it would hold its slots and memory for good.
#: The budget (50 s) must outlast the loss of a TaskManager: until the JobManager
#: drops it (``heartbeat.timeout`` in infra/flink-cluster.yaml, 15 s) a restart may
#: be scheduled on its slots and fail again, and every failure spends a restart. With
#: 3 restarts 5 s apart a kill -9 on a loaded machine failed the job for good.
FLINK_RESTARTS = 10
FLINK_RESTART_DELAY_MS = 5000


def runner_flags(args: list[str]) -> list[str]:
    """``args`` (a pipeline's command line) plus the runner flags our jobs need on
    Flink, unless given: ``--finish_bundle_before_checkpointing`` with checkpointing
    (see the module docstring) and a bounded restart strategy (``FLINK_RESTARTS``)."""
    out = list(args)
    if runner_name(args) != "flink":
        return out
    if (has_flag(args, "--checkpointing_interval")
            and not has_flag(args, "--finish_bundle_before_checkpointing")):
        out.append("--finish_bundle_before_checkpointing")
    if not has_flag(args, "--number_of_execution_retries"):
        out.append(f"--number_of_execution_retries={FLINK_RESTARTS}")
        if not has_flag(args, "--execution_retry_delay"):
            out.append(f"--execution_retry_delay={FLINK_RESTART_DELAY_MS}")
    return out


def pipeline_options(argv=None):
    """The pipeline options of a job's command line (``sys.argv`` when None), in Beam's
    spelling (``beam_spelling``) and with ``runner_flags`` applied."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(runner_flags(beam_spelling(sys.argv[1:] if argv is None else argv)))


class _Stop(Exception):
    """Raised in the main thread by the signal handler."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def cancel_and_wait(result, timeout_s: float = 60.0) -> str:
    """Cancel the job behind ``result`` and wait for a terminal state; returns it."""
    from apache_beam.runners.runner import PipelineState

    try:
        result.cancel()
    except Exception as exc:  # the runner may already be gone; report and go on
        log.warning("cancelling the job failed: %s", exc)
        return str(getattr(result, "state", "UNKNOWN"))
    deadline = time.monotonic() + timeout_s
    while not PipelineState.is_terminal(result.state):
        if time.monotonic() > deadline:
            log.warning("the job is still %s %.0fs after cancel", result.state, timeout_s)
            break
        time.sleep(0.5)
    return str(result.state)


#: Deadline of the launcher's watch on a streaming job. Beam's portable runner
#: puts ``--job_server_timeout`` (default 300 s) on the job-state stream as a
#: gRPC deadline and ``wait_until_finish()`` raises when it passes: the
#: launcher, with the LOOPBACK workers inside it, would end the job after five
#: minutes.
WATCH_S = 365 * 24 * 3600
_BEAM_DEFAULT_JOB_SERVER_TIMEOUT_S = 300


def _watch_for_as_long_as_it_runs(pipeline) -> None:
    from apache_beam.options.pipeline_options import PortableOptions

    portable = pipeline.options.view_as(PortableOptions)
    if portable.job_server_timeout == _BEAM_DEFAULT_JOB_SERVER_TIMEOUT_S:
        portable.job_server_timeout = WATCH_S


def run_until_done(pipeline, cancel_timeout_s: float = 60.0):
    """Run ``pipeline`` and wait until it ends; cancel it on SIGTERM or SIGINT.

    Returns the ``PipelineResult``. Signal handlers are only installed from
    the main thread (tests may call this from another one; they cancel the
    result themselves). Installs ``answer_empty_finalizations`` and
    ``lengthen_grpc_waits`` first.
    """
    answer_empty_finalizations()
    lengthen_grpc_waits()
    _watch_for_as_long_as_it_runs(pipeline)
    result = pipeline.run()
    if threading.current_thread() is not threading.main_thread():
        result.wait_until_finish()
        return result
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result.wait_until_finish()
    except (_Stop, KeyboardInterrupt) as stop:
        log.info("%s: cancelling the job", stop or "SIGINT")
        for sig in previous:  # a second signal during the cancel must not interrupt it
            signal.signal(sig, signal.SIG_IGN)
        state = cancel_and_wait(result, cancel_timeout_s)
        log.info("job %s", state)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result


# ---------------------------------------------------------------- Prism's finalization of empty bundles


_NOT_FINALIZABLE = "Bundle is not in a finalizable state"


def answer_empty_finalizations() -> None:
    """Make this process's SDK harness answer a finalization of a bundle that registered
    nothing to finalize with success, in one log line, as the Java SDK does.

    Prism finalizes every bundle of a stage holding a DoFn that asks for finalization
    (the Kafka source, which commits offsets there). When its fuser puts the source's
    restriction pairing and sizing in a stage of their own, that stage's bundles never
    call the read, register no callback, and the Python SDK (2.77) raises "Bundle is not
    in a finalizable state" with a traceback in the job log: nothing was lost, there was
    nothing to commit. Installed by ``run_until_done``; idempotent.
    """
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import sdk_worker

    original = sdk_worker.SdkWorker.finalize_bundle
    if getattr(original, "_feedbeam", False):
        return

    @functools.wraps(original)
    def finalize_bundle(self, request, instruction_id):
        try:
            return original(self, request, instruction_id)
        except RuntimeError as exc:
            if not str(exc).startswith(_NOT_FINALIZABLE):
                raise
        log.info("bundle %s registered nothing to finalize (a stage of the Kafka source that "
                 "does not read, which Prism finalizes too): answered as done",
                 request.instruction_id)
        return beam_fn_api_pb2.InstructionResponse(
            instruction_id=instruction_id,
            finalize_bundle=beam_fn_api_pb2.FinalizeBundleResponse())

    finalize_bundle._feedbeam = True
    sdk_worker.SdkWorker.finalize_bundle = finalize_bundle


# ---------------------------------------------------------------- gRPC's wake-ups while idle


#: The longest a thread blocked on a gRPC call sleeps before it wakes to look
#: again (gRPC's own default: 0.1 s); the environment's ``FEEDBEAM_GRPC_WAIT_S``
#: overrides it.
GRPC_WAIT_S = 1.0


def lengthen_grpc_waits(seconds: float | None = None) -> float:
    """Make this process's threads blocked on gRPC wake every ``seconds`` (None:
    ``FEEDBEAM_GRPC_WAIT_S``, else ``GRPC_WAIT_S``) instead of every 0.1 s; returns
    the value it replaced.

    gRPC's Python layer waits on a call's condition in slices of
    ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` (0.1 s) so that the main thread stays
    responsive to signals. A LOOPBACK job has about ten threads blocked so (the
    control, data, state and job-state streams, the launcher's watch): a hundred
    wake-ups a second that do nothing, 0.9 % of a core per idle job of the 2.4 %
    measured (docs/pipelines/kafka-io.md#how-a-partition-is-read). An answer still wakes its
    waiter at once (it is notified); only a signal waits up to ``seconds``
    (SIGTERM's cancel starts up to 1 s later). Idempotent.
    """
    import grpc._common

    if seconds is None:
        seconds = float(os.environ.get("FEEDBEAM_GRPC_WAIT_S", GRPC_WAIT_S))
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    previous = grpc._common.MAXIMUM_WAIT_TIMEOUT
    grpc._common.MAXIMUM_WAIT_TIMEOUT = seconds
    return previous


# ---------------------------------------------------------------- command lines


class OptionsError(ValueError):
    """A pipeline command line that would not run as written: an unknown option, a bad value."""


@dataclasses.dataclass(frozen=True)
class CheckedOptions:
    """A checked command line in Beam's spelling. ``unchecked``: options passed on that only
    the runner could know, whose list it did not give (``why``)."""

    args: list[str]
    unchecked: list[str] = dataclasses.field(default_factory=list)
    why: str = ""


def wants_help(args: list[str]) -> bool:
    return "-h" in args or "--help" in args


def beam_spelling(args: list[str]) -> list[str]:
    """``args`` with every option named as Beam names it: ``--topic-prefix`` becomes
    ``--topic_prefix``. Beam knows every option by its underscore name, and drops one
    it does not know, so the dashed spelling the CLI documents is translated, not refused."""
    out = []
    for a in args:
        name, sep, value = a[2:].partition("=")
        if a.startswith("--") and "-" in name:
            a = f"--{name.replace('-', '_')}{sep}{value}"
        out.append(a)
    return out


def dashed(flag: str) -> str:
    """``--topic_prefix`` -> ``--topic-prefix``: the spelling help and errors show."""
    return "--" + flag[2:].replace("_", "-")


def pipeline_option_classes(module) -> list[type]:
    """The feedbeam ``PipelineOptions`` classes a pipeline module defines or imports (its
    own first): every option it reads besides Beam's."""
    from apache_beam.options.pipeline_options import PipelineOptions

    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, PipelineOptions)
             and v is not PipelineOptions and not _is_beams(v)]
    return sorted(found, key=lambda cls: cls.__module__ != module.__name__)


def _is_beams(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "apache_beam"


def _beam_option_classes() -> list[type]:
    """Every ``PipelineOptions`` class Beam registered (subclasses at any depth)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    out, todo = [], list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if _is_beams(cls) and cls not in out:
            out.append(cls)
    return out


class _Into:
    """Handed to an options class's ``_add_argparse_args`` instead of a parser: every
    argument it declares, in a group of its own or not, goes to ``target``, and its
    option names to ``names``."""

    def __init__(self, target, names: list[str]):
        self._target, self.names = target, names

    def add_argument(self, *flags, **kwargs):
        self.names.extend(f for f in flags if f.startswith("--"))
        return self._target.add_argument(*flags, **kwargs)

    def add_value_provider_argument(self, *flags, **kwargs):
        add = getattr(self._target, "add_value_provider_argument", None)
        if add is None:  # a help section: shown as a plain argument
            return self.add_argument(*flags, **kwargs)
        self.names.extend(f for f in flags if f.startswith("--"))
        return add(*flags, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        return self

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return self


@functools.cache
def _parser_class():
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    class Parser(_BeamArgumentParser):
        def error(self, message):
            raise OptionsError(message)

    return Parser


def _new_parser():
    # "resolve": two classes declaring one option (a Beam example imported by a test)
    # must not stop the check; Beam's own parse would read it either way.
    return _parser_class()(allow_abbrev=False, add_help=False, conflict_handler="resolve")


#: Runners whose own options only their job server lists (DescribePipelineOptions).
JOB_SERVER_RUNNERS = ("flink", "spark", "portable", "samza")
_RUNNER_OPTIONS: dict[str, tuple] = {}


def runner_options(job_endpoint: str, timeout_s: float = 10.0) -> tuple | None:
    """``(name, type, default)`` of each option the job server at ``job_endpoint`` lists
    for its runner (``beam_job_api_pb2.PipelineOptionType``); None when it does not answer."""
    if job_endpoint in _RUNNER_OPTIONS:
        return _RUNNER_OPTIONS[job_endpoint]
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2 as api
    from apache_beam.portability.api import beam_job_api_pb2_grpc as api_grpc

    try:
        with grpc.insecure_channel(job_endpoint) as channel:
            response = api_grpc.JobServiceStub(channel).DescribePipelineOptions(
                api.DescribePipelineOptionsRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        log.debug("job server %s did not list its options: %s", job_endpoint, exc)
        return None
    found = tuple((o.name, o.type, o.default_value) for o in response.options)
    _RUNNER_OPTIONS[job_endpoint] = found
    return found


def _add_runner_options(parser, options: tuple, names: list[str]) -> None:
    """Declare the job server's options as Beam's portable runner does when it submits."""
    from apache_beam.portability.api import beam_job_api_pb2 as api

    for name, kind, default in options:
        kwargs: dict = {}
        if kind == api.PipelineOptionType.BOOLEAN:
            kwargs["action"] = "store_false" if default == "true" else "store_true"
        elif kind == api.PipelineOptionType.INTEGER:
            kwargs["type"] = int
        elif kind == api.PipelineOptionType.ARRAY:
            kwargs["action"] = "append"
        parser.add_argument(f"--{name}", **kwargs)
        names.append(f"--{name}")


def _is_value(token: str) -> bool:
    return not token.startswith("-") or re.fullmatch(r"-[\d.]+", token) is not None


def _leftovers(rest: list[str]):
    """The options (and stray arguments) a parse left, each once, without their values."""
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--") and len(token) > 2:
            yield token.split("=", 1)[0]
            if "=" not in token and i + 1 < len(rest) and _is_value(rest[i + 1]):
                i += 1
        elif token != "--":
            yield token
        i += 1


def declared_flags(module) -> list[str]:
    """The options ``module``'s own classes declare, by Beam's name (``--topic_prefix``)."""
    names: list[str] = []
    parser = _new_parser()
    for cls in pipeline_option_classes(module):
        cls._add_argparse_args(_Into(parser, names))
    return names


def check_options(module, args: list[str], *, describe=runner_options) -> CheckedOptions:
    """``args``, a pipeline's command line, in Beam's spelling, checked before anything starts.

    Known options: those of ``module``'s classes (``pipeline_option_classes``), of
    Beam's registered classes and, for a runner in ``JOB_SERVER_RUNNERS``, those its job
    server at ``--job_endpoint`` lists (``describe``). Raises ``OptionsError`` naming
    every other option with the nearest known one, or a value the option refuses. When
    the runner's list cannot be had, an unknown option not close to one of the
    pipeline's own is passed on (``CheckedOptions.unchecked``) rather than refused.
    """
    args = beam_spelling(list(args))
    own: list[str] = []
    known: list[str] = []
    parser = _new_parser()
    for cls in pipeline_option_classes(module):
        cls._add_argparse_args(_Into(parser, own))
    for cls in _beam_option_classes():
        cls._add_argparse_args(_Into(parser, known))
    try:
        _, rest = parser.parse_known_args(args)
    except OptionsError as exc:  # a value the option refuses
        raise OptionsError(f"{exc}. Nothing was started") from None
    why = ""
    runner = runner_name(args)
    if rest and runner in JOB_SERVER_RUNNERS:
        endpoint = flag_value(args, "--job_endpoint")
        listed = describe(endpoint) if endpoint else None
        if listed is None:
            why = (f"the job server at {endpoint} did not list the {runner} runner's options"
                   if endpoint else f"no --job_endpoint to ask for the {runner} runner's options")
        else:
            runner_parser = _new_parser()
            _add_runner_options(runner_parser, listed, known)
            try:
                _, rest = runner_parser.parse_known_args(rest)
            except OptionsError as exc:
                raise OptionsError(f"{exc}. Nothing was started") from None
    names = [n[2:] for n in own + known]
    problems, unchecked = [], []
    for flag in _leftovers(rest):
        if not flag.startswith("--"):
            problems.append(f"unexpected argument {flag!r}")
            continue
        if why and not difflib.get_close_matches(flag[2:], [n[2:] for n in own], 1, 0.75):
            unchecked.append(flag)
            continue
        near = difflib.get_close_matches(flag[2:], names, 1, 0.6)
        problems.append(f"unknown option {dashed(flag)}"
                        + (f" (did you mean {dashed('--' + near[0])}?)" if near else ""))
    if problems:
        raise OptionsError(f"{'; '.join(problems)}. Nothing was started; --help lists the "
                           f"options of {module.__name__}")
    return CheckedOptions(args, unchecked, why)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options in the documented spelling (dashes), each with its default."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = dashed(action.option_strings[0])
        if action.nargs == 0:
            return flag
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False
                or default in ("", []) or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()

    def _expand_help(self, action):
        try:
            return super()._expand_help(action)
        except (KeyError, TypeError, ValueError):  # a literal % in a help text
            return action.help or ""


_EPILOG = """\
Options take dashes or underscores (--topic-prefix or --topic_prefix). Beam's own
options (--runner, --job-endpoint, --environment-type, --streaming, ...) and, on
Flink, those its job server lists (--parallelism, --checkpointing-interval, ...)
are accepted too; any other option is an error, before anything starts.

A run isolated from the default topics, offsets, Redis keys and keyspace:
  --topic-prefix t1. --consumer-group t1-{name} --redis-key-prefix t1 --cassandra-keyspace t1
(`feedbeam topics create --topic-prefix t1.` and `feedbeam migrate --cassandra-keyspace t1`
first; `feedbeam clean` with the same four options removes it all)."""


def options_help(module, prog: str, epilog: str = "") -> str:
    """``--help`` of a pipeline: its own options and the shared ones it reads (stores,
    replay, Kafka), with their defaults, one section per ``PipelineOptions`` class;
    ``epilog`` goes before the notes on spelling and isolated runs."""
    doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("``", "")
    notes = _EPILOG.format(name=module.__name__.rsplit(".", 1)[-1])
    parser = argparse.ArgumentParser(prog=prog, usage=f"{prog} [OPTION ...]", description=doc,
                                     epilog=f"{epilog}\n\n{notes}" if epilog else notes,
                                     formatter_class=_HelpFormatter,
                                     add_help=False, conflict_handler="resolve")
    for cls in pipeline_option_classes(module):
        about = (cls.__doc__ or "").strip().split("\n")[0].replace("``", "")
        cls._add_argparse_args(_Into(parser.add_argument_group(cls.__name__, about), []))
    return parser.format_help()
