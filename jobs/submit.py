"""``feedbeam submit | status | cancel``: run the pipelines on a Beam runner and watch them.

    feedbeam submit fanout                          # Prism, foreground; Ctrl-C cancels
    feedbeam submit fanout --help                   # the pipeline's options, with defaults
    feedbeam submit fanout --detach --topic-prefix t1. --consumer-group t1-fanout \\
        --redis-key-prefix t1 --cassandra-keyspace t1           # an isolated run
    feedbeam submit features --runner flink --detach
    feedbeam status [JOB | PIPELINE] [--topic-prefix P] [--consumer-group G]
    feedbeam cancel JOB | PIPELINE [--topic-prefix P] [--consumer-group G] [--all]

``submit`` starts ``python -m pipelines.<name>`` on a runner (``prism``, the
default; ``flink``; ``direct`` for bounded runs; ``dataflow``) with the local
stack's addresses filled in for the options the pipeline declares. Every other
option goes to the pipeline and to Beam, after ``pipelines.runtime.check_options``
refused any that neither reads. A job's record (pid, runner, topic prefix,
consumer group, topics, log) is kept in ``<state_dir>/jobs`` for ``status`` and
``cancel``. ``docs/operations.md`` covers the runners, isolated runs, detached
jobs and what the lag means.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

from infra.errors import UserFacingError
from infra.services import (
    flink_job_endpoint,
    flink_job_server_ready,
    kafka_ready,
    prism_job_endpoint,
    prism_ready,
)
from infra.processes import lower_priority
from infra.settings import REPO_ROOT, StackSettings
from pipelines.runtime import (
    OptionsError,
    beam_spelling,
    check_options,
    declared_flags,
    flag_value,
    has_flag,
    options_help,
    wants_help,
)
from stores.kafka.lag import group_lag

RUNNERS = ("prism", "flink", "direct", "dataflow")
#: Flink checkpoint interval unless given: offsets are committed at each checkpoint, so
#: this bounds what a restart re-reads (seconds of input, applied idempotently again).
FLINK_CHECKPOINT_MS = 10_000
#: ``--parallelism`` of a job on the cluster topology's Flink session cluster.
CLUSTER_PARALLELISM = 2


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What ``submit`` and ``status`` need to know about one pipeline."""

    module: str
    group: str
    topics: tuple[str, ...]
    #: Further steps of the job with consumer groups of their own: (suffix of the
    #: job's group, topics they read); ``status`` shows their lag beside the job's.
    steps: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: OS niceness on a machine shared with the serving API (``--nice``, the demo):
    #: the fan-out, whose freshness readers see within a second, gives way to
    #: requests but not to the other jobs; they, whose work waits (aggregates, a
    #: story's state, re-rankings a newer post tops anyway), give way to all.
    shared_nice: int = 19


#: The pipelines ``submit`` can start: module, default consumer group, topics read.
PIPELINES: dict[str, PipelineSpec] = {
    # The fan-out's and the stories' durable steps read their durable logs as
    # <group>-durable (pipelines.common.DURABLE_LOG_TOPIC, STORIES_DURABLE_LOG_TOPIC,
    # DURABLE_GROUP_SUFFIX): Cassandra's lag.
    "fanout": PipelineSpec("pipelines.fanout", "feedbeam-fanout",
                           ("post-events", "follow-events"),
                           steps=(("-durable", ("fanout-durable",)),), shared_nice=10),
    "features": PipelineSpec("pipelines.features", "feedbeam-features",
                             ("engagement-events", "post-events")),
    "stories": PipelineSpec("pipelines.stories", "feedbeam-stories", ("story-events",),
                            steps=(("-durable", ("stories-durable",)),)),
    "ranking": PipelineSpec("pipelines.ranking", "feedbeam-ranking",
                            ("post-events", "engagement-events", "follow-events")),
}


def jobs_dir(settings: StackSettings) -> Path:
    return Path(settings.state_dir) / "jobs"


# ---------------------------------------------------------------- building the command


def runner_args(runner: str, settings: StackSettings, beam_args: list[str]) -> list[str]:
    """The options that select and configure ``runner`` (before the user's own)."""
    if runner == "prism":
        out = ["--runner=PrismRunner"]
        if not has_flag(beam_args, "--job_endpoint") and not has_flag(beam_args,
                                                                        "--prism_location"):
            # The stack's one Prism job server: jobs share it instead of each
            # starting (and keeping busy) a Prism process of its own.
            if not prism_ready(settings):
                raise UserFacingError(
                    f"the Prism job server is not answering at {prism_job_endpoint(settings)}; "
                    "start it with `feedbeam infra up` (or pass --prism_location to run a "
                    "private one)")
            out.append(f"--job_endpoint={prism_job_endpoint(settings)}")
        if not has_flag(beam_args, "--environment_type"):
            out.append("--environment_type=LOOPBACK")
        return out
    if runner == "flink":
        endpoint = flink_job_endpoint(settings)
        if not has_flag(beam_args, "--job_endpoint") and not flink_job_server_ready(settings):
            start = ("`feedbeam infra up --topology cluster`" if settings.clustered
                     else "`feedbeam infra up flink`")
            raise UserFacingError(f"the Flink job server is not answering at {endpoint}; "
                                  f"start it with {start}")
        out = ["--runner=FlinkRunner"]
        if not has_flag(beam_args, "--job_endpoint"):
            out.append(f"--job_endpoint={endpoint}")
        if not has_flag(beam_args, "--environment_type"):
            out.append("--environment_type=LOOPBACK")
        if not has_flag(beam_args, "--checkpointing_interval"):
            # Without checkpoints Flink never finalizes bundles: no offset is committed.
            out.append(f"--checkpointing_interval={FLINK_CHECKPOINT_MS}")
        if settings.clustered and not has_flag(beam_args, "--parallelism"):
            # Spread over both TaskManagers of the session cluster.
            out.append(f"--parallelism={CLUSTER_PARALLELISM}")
        return out
    if runner == "direct":
        if not has_flag(beam_args, "--replay_ranges"):
            raise UserFacingError(
                "the direct runner runs bounded work only: give --replay_ranges (or use "
                "`feedbeam replay TOPIC ... --pipeline NAME`); stream with --runner prism or flink")
        return ["--runner=FnApiRunner"]
    if runner == "dataflow":
        missing = [f for f in ("--project", "--region", "--temp_location")
                   if not has_flag(beam_args, f)]
        if missing:
            raise UserFacingError("--runner dataflow needs " + ", ".join(missing))
        return ["--runner=DataflowRunner", f"--setup_file={REPO_ROOT / 'setup.py'}"]
    raise UserFacingError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")


def stack_defaults(module, settings: StackSettings, beam_args: list[str]) -> list[str]:
    """The local stack's addresses for the options ``module`` declares and the user left out."""
    declared = declared_flags(module)
    candidates = {
        "--kafka_bootstrap": settings.kafka_bootstrap,
        "--redis_url": settings.redis_url,
        "--cassandra_host": settings.cassandra_host,
        "--cassandra_port": str(settings.cassandra_port),
    }
    return [f"{flag}={value}" for flag, value in candidates.items()
            if flag in declared and not has_flag(beam_args, flag)]


def load_pipeline(pipeline: str):
    """The module of ``pipeline`` (one of ``PIPELINES``), imported."""
    spec = PIPELINES.get(pipeline)
    if spec is None:
        raise UserFacingError(f"unknown pipeline {pipeline!r}; choose one of "
                              + ", ".join(PIPELINES))
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        raise UserFacingError(f"pipeline {pipeline!r} cannot be loaded ({exc})") from None


def build_command(pipeline: str, runner: str, settings: StackSettings,
                  beam_args: list[str]) -> list[str]:
    """The argv of ``python -m pipelines.<pipeline>`` for ``runner``, in Beam's spelling.

    An option neither the pipeline, Beam nor the runner reads is a ``UserFacingError``
    naming the nearest known one (``pipelines.runtime.check_options``).
    """
    module = load_pipeline(pipeline)
    beam_args = beam_spelling(beam_args)
    streaming = [] if (has_flag(beam_args, "--replay_ranges")
                       or has_flag(beam_args, "--streaming")) else ["--streaming"]
    args = [*runner_args(runner, settings, beam_args), *streaming,
            *stack_defaults(module, settings, beam_args), *beam_args]
    try:
        checked = check_options(module, args)
    except OptionsError as exc:
        raise UserFacingError(f"submit {pipeline}: {exc}") from None
    if checked.unchecked:
        print(f"feedbeam: passed on unchecked ({checked.why}): {' '.join(checked.unchecked)}",
              file=sys.stderr)
    return [sys.executable, "-m", PIPELINES[pipeline].module, *checked.args]


_SUBMIT_EPILOG = """\
submit's own options: --runner {prism,flink,direct,dataflow} (default: prism),
--detach (run in the background: `feedbeam status`, `feedbeam cancel`),
--print-only (show the command). The local stack's addresses (--kafka-bootstrap,
--redis-url, --cassandra-host, --cassandra-port) are filled in unless given."""


def pipeline_help(pipeline: str) -> str:
    """``feedbeam submit PIPELINE --help``: the pipeline's options with their defaults."""
    return options_help(load_pipeline(pipeline), f"feedbeam submit {pipeline}", _SUBMIT_EPILOG)


# ---------------------------------------------------------------- job records


@dataclasses.dataclass
class JobRecord:
    """A submitted job: what ``status`` shows and ``cancel`` stops. ``start_ticks`` (the
    process start time in /proc) tells the job's process from a later one given its pid."""

    job_id: str
    pipeline: str
    runner: str
    pid: int
    started_at: str
    log_path: str
    group: str
    topics: list[str]
    argv: list[str]
    topic_prefix: str = ""
    start_ticks: str = ""

    def path(self, settings: StackSettings) -> Path:
        return jobs_dir(settings) / f"{self.job_id}.json"

    def save(self, settings: StackSettings) -> None:
        path = self.path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        tmp.replace(path)

    def alive(self) -> bool:
        return process_alive(self.pid, self.start_ticks)

    def matches(self, target: str | None = None, topic_prefix: str | None = None,
                groups: Sequence[str] = ()) -> bool:
        """Whether this job is ``target`` (its id or pipeline), runs on ``topic_prefix``
        and reads as one of ``groups``; a criterion left out matches any job."""
        return ((target is None or target in (self.job_id, self.pipeline))
                and (topic_prefix is None or self.topic_prefix == topic_prefix)
                and (not groups or self.group in groups))


class ProcStat(NamedTuple):
    """A process as /proc shows it: state (``R``, ``S``, ``Z`` zombie...), process group,
    start time in clock ticks since boot."""

    state: str
    pgid: int
    start_ticks: str


def proc_stat(pid: int) -> ProcStat | None:
    """``pid`` as /proc shows it; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields are counted after the command name, which may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2:].split()
    return ProcStat(fields[0], int(fields[2]), fields[19])


def process_alive(pid: int, start_ticks: str = "") -> bool:
    """Whether ``pid`` is still the process started at ``start_ticks`` ("" skips that check).

    A zombie is dead: a job killed after its ``feedbeam submit`` exited belongs to
    whatever adopted it, which may never reap it. One that is this process's own
    child (a foreground submit, a test harness) is reaped here.
    """
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    stat = proc_stat(pid)
    if stat is None:
        return False
    return stat.state not in ("Z", "X") and (not start_ticks or stat.start_ticks == start_ticks)


def load_jobs(settings: StackSettings) -> list[JobRecord]:
    out = []
    for path in sorted(jobs_dir(settings).glob("*.json")):
        try:
            out.append(JobRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a record being written or from another version: not ours to judge
    return out


def _job_id(pipeline: str) -> str:
    return f"{pipeline}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def effective_group(pipeline: str, beam_args: list[str]) -> str:
    return flag_value(beam_spelling(beam_args), "--consumer_group") or PIPELINES[pipeline].group


def effective_prefix(beam_args: list[str]) -> str:
    return flag_value(beam_spelling(beam_args), "--topic_prefix") or ""


def effective_topics(pipeline: str, beam_args: list[str]) -> list[str]:
    prefix = effective_prefix(beam_args)
    return [prefix + t for t in PIPELINES[pipeline].topics]


# ---------------------------------------------------------------- commands


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="start a pipeline on a Beam runner",
        description=__doc__.split("\n\n")[0],
        epilog="`feedbeam submit PIPELINE --help` lists the pipeline's options. Every option "
               "submit does not know is passed to the pipeline and to Beam; one that neither "
               "reads is an error.")
    p.add_argument("pipeline", choices=sorted(PIPELINES))
    p.add_argument("--runner", choices=RUNNERS, default="prism")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; see `feedbeam status`, stop with `feedbeam cancel`")
    p.add_argument("--print-only", action="store_true",
                   help="print the command instead of running it")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="run the job, its runner and workers at OS niceness N (0-19), its "
                        "session's scheduling group too: on a machine shared with the serving "
                        "API, 10 lets requests take the CPU first (docs/operations.md)")
    p.add_argument("beam_args", nargs=argparse.REMAINDER,
                   help="pipeline and Beam options (passed through)")
    p.set_defaults(handler=run_submit)

    s = subparsers.add_parser(
        "status", help="jobs, consumer lag and throughput",
        description="Jobs started by `feedbeam submit` and the lag of consumer groups, scoped "
                    "by what a run is: a job or pipeline, a topic prefix, consumer groups.")
    _scope_options(s, "only this job (as listed) or this pipeline's jobs", lag=True)
    s.add_argument("--interval", type=float, default=2.0,
                   help="seconds between the two offset samples that give events/s")
    s.set_defaults(handler=run_status)

    c = subparsers.add_parser(
        "cancel", help="stop jobs started by `feedbeam submit`",
        description="Stop the jobs that match; more than one needs --all (or a yes on a "
                    "terminal).")
    _scope_options(c, "a job id as `feedbeam status` lists it, or a pipeline name")
    c.add_argument("--all", action="store_true",
                   help="stop every job that matches (needed when more than one does)")
    c.set_defaults(handler=run_cancel)


def _scope_options(parser, target_help: str, lag: bool = False) -> None:
    """What a run is, for status and cancel: a job or pipeline, a prefix, groups."""
    parser.add_argument("target", nargs="?", metavar="JOB|PIPELINE", help=target_help)
    parser.add_argument("--topic-prefix", default=None, metavar="P",
                        help="only jobs on topics with this prefix"
                             + (" (and the default groups' lag there)" if lag else ""))
    parser.add_argument("--consumer-group", "--group", dest="group", action="append",
                        default=[], metavar="G",
                        help="only jobs reading as this consumer group (repeatable)"
                             + ("; its lag on every topic it committed on" if lag else ""))


def split_own_flags(args: argparse.Namespace) -> list[str]:
    """Take ``--runner``, ``--nice``, ``--detach`` and ``--print-only`` out of the
    passed-through options (argparse leaves everything after the pipeline name
    there) onto ``args``."""
    rest: list[str] = []
    items = iter(args.beam_args)
    for a in items:
        if a == "--":
            continue
        if a in ("--detach", "--print-only", "--print_only"):
            setattr(args, a[2:].replace("-", "_"), True)
        elif a == "--runner" or a.startswith("--runner="):
            value = a.split("=", 1)[1] if "=" in a else next(items, None)
            if value not in RUNNERS:
                raise UserFacingError(f"--runner must be one of {', '.join(RUNNERS)}, "
                                      f"not {value!r}")
            args.runner = value
        elif a == "--nice" or a.startswith("--nice="):
            value = a.split("=", 1)[1] if "=" in a else next(items, None)
            try:
                args.nice = int(value)
            except (TypeError, ValueError):
                raise UserFacingError(f"--nice takes a niceness from 0 to 19, not {value!r}") \
                    from None
        else:
            rest.append(a)
    return rest


def run_submit(args: argparse.Namespace, settings: StackSettings) -> int:
    beam_args = split_own_flags(args)
    if not 0 <= args.nice <= 19:
        raise UserFacingError(f"--nice takes a niceness from 0 to 19, not {args.nice}")
    if wants_help(beam_args):
        print(pipeline_help(args.pipeline))
        return 0
    argv = build_command(args.pipeline, args.runner, settings, beam_args)
    if args.print_only:
        print(" ".join(argv))
        return 0
    beam_args = argv[3:]
    job_id = _job_id(args.pipeline)
    log_path = Path(settings.state_dir) / "logs" / f"job-{job_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"--- feedbeam submit {dt.datetime.now().isoformat()}: "
                  f"{' '.join(argv[1:])}\n".encode())
    out = open(log_path, "ab") if args.detach else None
    try:
        # Its own session: cancel signals the job, its runner and its workers together.
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT if out else None,
                                   start_new_session=True)
    finally:
        if out is not None:
            out.close()
    if args.nice:
        lower_priority(process.pid, args.nice)
    stat = proc_stat(process.pid)
    record = JobRecord(job_id, args.pipeline, args.runner, process.pid,
                       dt.datetime.now().isoformat(timespec="seconds"), str(log_path),
                       effective_group(args.pipeline, beam_args),
                       effective_topics(args.pipeline, beam_args), argv[1:],
                       effective_prefix(beam_args), stat.start_ticks if stat else "")
    record.save(settings)
    if args.detach:
        time.sleep(2.0)
        if process.poll() is not None:
            record.path(settings).unlink(missing_ok=True)
            raise UserFacingError(f"{job_id} exited at once (code {process.returncode}); "
                                  f"its log is {log_path}")
        print(f"{job_id} started on {args.runner} (pid {process.pid}); log {log_path}\n"
              f"  feedbeam status {job_id}       # lag and throughput\n"
              f"  feedbeam cancel {job_id}")
        return 0
    print(f"{job_id} running on {args.runner} (pid {process.pid}); Ctrl-C cancels it",
          file=sys.stderr)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_process_group(process.pid)
        return 130
    finally:
        record.path(settings).unlink(missing_ok=True)


def stop_process_group(pid: int, grace_s: float = 60.0) -> bool:
    """Stop a submitted job; True if it is gone.

    First SIGTERM to the job's own process, which cancels the job on the
    runner and waits for it to end (``pipelines.runtime``): killing the whole
    session at once would take Prism down before it heard the cancel, or leave
    a Flink job running without its workers. Then SIGTERM and SIGKILL to the
    session for whatever is left (Prism, workers).
    """
    steps = ((lambda s: os.kill(pid, s), signal.SIGTERM, grace_s),
             (lambda s: os.killpg(pid, s), signal.SIGTERM, 10.0),
             (lambda s: os.killpg(pid, s), signal.SIGKILL, 10.0))
    for send, sig, wait_s in steps:
        try:
            send(sig)
        except ProcessLookupError:
            _reap_group(pid)
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not process_alive(pid):
                _reap_group(pid)
                return True
            time.sleep(0.2)
    return False


def _reap_group(pgid: int) -> None:
    """Kill what is left of a job's session once its main process is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def select_jobs(args: argparse.Namespace, settings: StackSettings) -> list[JobRecord]:
    """The recorded jobs ``args`` (``target``, ``--topic-prefix``, ``--consumer-group``) names."""
    if args.target is not None and args.target not in PIPELINES and not any(
            j.job_id == args.target for j in load_jobs(settings)):
        raise UserFacingError(f"no job {args.target!r}; `feedbeam status` lists them")
    return [j for j in load_jobs(settings)
            if j.matches(args.target, args.topic_prefix, args.group)]


def run_cancel(args: argparse.Namespace, settings: StackSettings) -> int:
    if args.target is None and args.topic_prefix is None and not args.group and not args.all:
        raise UserFacingError("say which jobs: a job id, a pipeline name, --topic-prefix or "
                              "--consumer-group (--all alone stops every job)")
    jobs = select_jobs(args, settings)
    if not jobs:
        raise UserFacingError("no job matches; `feedbeam status` lists them")
    if len(jobs) > 1 and not args.all and not _confirm(jobs):
        listing = "\n".join(f"  {j.job_id} ({_scope(j)})" for j in jobs)
        raise UserFacingError(f"{len(jobs)} jobs match:\n{listing}\nname one job id, narrow it "
                              "with --topic-prefix or --consumer-group, or pass --all")
    for job in jobs:
        if job.alive():
            if not stop_process_group(job.pid):
                raise UserFacingError(f"{job.job_id} (pid {job.pid}) did not stop")
            print(f"{job.job_id} stopped")
        else:
            stat = proc_stat(job.pid)
            if stat is None or stat.state == "Z":
                _reap_group(job.pid)  # a pid is not reused while its group lives
            print(f"{job.job_id} had already exited; record removed (log {job.log_path})")
        job.path(settings).unlink(missing_ok=True)
    return 0


def _confirm(jobs: list[JobRecord]) -> bool:
    """On a terminal, list ``jobs`` and ask before stopping all of them."""
    if not sys.stdin.isatty():
        return False
    for job in jobs:
        print(f"  {job.job_id} ({_scope(job)})")
    return input(f"stop these {len(jobs)} jobs? [y/N] ").strip().lower() in ("y", "yes")


def _scope(job: JobRecord) -> str:
    prefix = f"topic prefix {job.topic_prefix!r}, " if job.topic_prefix else ""
    return f"{prefix}group {job.group}"


# ---------------------------------------------------------------- status


def committed_topics(bootstrap: str, group: str) -> list[str]:
    """The topics ``group`` has committed offsets on (none if it does not exist)."""
    from confluent_kafka.admin import AdminClient

    from jobs import clean

    admin = AdminClient({"bootstrap.servers": bootstrap})
    return sorted(clean.committed_topics(admin, [group], timeout_s=15)[group])


def groups_to_show(args: argparse.Namespace, jobs: list[JobRecord],
                   bootstrap: str) -> dict[str, list[str]]:
    """``{group: topics}`` whose lag ``status`` shows: the groups of ``jobs``; each
    ``--consumer-group`` on the topics it committed on; unless a group or a job was
    named, the default group of each pipeline (or the one named) on the topics of
    ``--topic-prefix`` (none by default)."""
    prefix = args.topic_prefix or ""
    groups: dict[str, set[str]] = {}
    for job in jobs:
        groups.setdefault(job.group, set()).update(job.topics)
        spec = PIPELINES.get(job.pipeline)
        for suffix, topics in spec.steps if spec else ():
            groups.setdefault(job.group + suffix, set()).update(
                job.topic_prefix + t for t in topics)
    for group in args.group:
        topics = committed_topics(bootstrap, group) or [
            prefix + t for s in PIPELINES.values() for t in s.topics]
        groups.setdefault(group, set()).update(topics)
    if not args.group:
        specs = ([PIPELINES[args.target]] if args.target in PIPELINES
                 else [] if args.target else PIPELINES.values())
        for spec in specs:
            groups.setdefault(spec.group, set()).update(prefix + t for t in spec.topics)
            for suffix, topics in spec.steps:
                groups.setdefault(spec.group + suffix, set()).update(prefix + t for t in topics)
    return {g: sorted(t) for g, t in groups.items()}


def run_status(args: argparse.Namespace, settings: StackSettings) -> int:
    if not kafka_ready(settings):
        raise UserFacingError(f"Kafka is not answering at {settings.kafka_bootstrap}; "
                              "start the stack with `feedbeam infra up`")
    jobs = select_jobs(args, settings)
    print("jobs")
    if not jobs:
        print("  none started by `feedbeam submit`" + (" match" if _scoped(args) else "")
              + " (groups below may still have lag)")
    for job in jobs:
        state = "running" if job.alive() else "DEAD (exited; see its log)"
        print(f"  {job.job_id:<28} {job.pipeline:<9} {job.runner:<7} pid {job.pid:<7} "
              f"{state}, since {job.started_at}\n      {_scope(job)}; log {job.log_path}")
    groups = groups_to_show(args, jobs, settings.kafka_bootstrap)
    # Topics a group names that do not exist (yet) are left out, not an error.
    first = {g: group_lag(settings.kafka_bootstrap, g, t, missing_ok=True)
             for g, t in groups.items()}
    time.sleep(max(args.interval, 0.0))
    second = {g: group_lag(settings.kafka_bootstrap, g, t, missing_ok=True)
              for g, t in groups.items()}
    print(f"consumer groups (lag = end - committed offset; rates over {args.interval:.0f}s)")
    for group, parts in second.items():
        if not parts or all(p.committed is None for p in parts):
            if group in args.group:
                print(f"  {group}: no committed offset on {', '.join(groups[group])}")
            continue  # never committed: not running here
        before = {(p.topic, p.partition): p for p in first[group]}
        total_lag = sum(p.lag for p in parts if p.lag is not None)
        unknown = sum(p.lag is None for p in parts)
        done = sum((p.committed or 0) - (before[(p.topic, p.partition)].committed or 0)
                   for p in parts if (p.topic, p.partition) in before)
        produced = sum(p.end - before[(p.topic, p.partition)].end
                       for p in parts if (p.topic, p.partition) in before)
        rate = done / args.interval if args.interval > 0 else 0.0
        inrate = produced / args.interval if args.interval > 0 else 0.0
        print(f"  {group}: lag {total_lag:,}"
              + (f" (+ {unknown} partitions with no commit yet)" if unknown else "")
              + f", applied {rate:,.0f} ev/s, produced {inrate:,.0f} ev/s")
        for p in parts:
            committed = "-" if p.committed is None else f"{p.committed:,}"
            lag = "-" if p.lag is None else f"{p.lag:,}"
            print(f"    {p.topic + f'[{p.partition}]':<24} committed {committed:>12}  "
                  f"end {p.end:>12,}  lag {lag:>10}")
    return 0


def _scoped(args: argparse.Namespace) -> bool:
    return args.target is not None or args.topic_prefix is not None or bool(args.group)
