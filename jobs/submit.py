"""``feedbeam submit | status | cancel``: run the pipelines on a Beam runner and watch them.

    feedbeam submit fanout                          # Prism, foreground; Ctrl-C cancels
    feedbeam submit features --runner flink --detach
    feedbeam submit stories --runner flink --flink_master flink-jm:8081 --parallelism 4
    feedbeam submit ranking --runner dataflow --project P --region R --temp_location gs://b/t
    feedbeam status                                 # jobs, lag per partition, events/s
    feedbeam cancel fanout-20261121-101500

``submit`` starts ``python -m pipelines.<name>`` on a runner (``prism``, the
default; ``flink``; ``direct`` for bounded runs; ``dataflow``) with the local
stack's addresses filled in for the options the pipeline declares; every
option it does not know goes to the pipeline and to Beam unchanged. A job's
record (pid, runner, consumer group, topics, log) is kept in
``<state_dir>/jobs`` for ``status`` and ``cancel``. ``docs/operations.md``
covers the runners, detached jobs and what the lag means.
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

from infra.errors import UserFacingError
from infra.services import (
    flink_job_endpoint,
    flink_ready,
    kafka_ready,
    prism_job_endpoint,
    prism_ready,
)
from infra.settings import REPO_ROOT, StackSettings
from pipelines.runtime import has_flag
from stores.kafka.lag import group_lag

RUNNERS = ("prism", "flink", "direct", "dataflow")
#: Flink checkpoint interval unless given: offsets are committed at each checkpoint, so
#: this bounds what a restart re-reads (seconds of input, applied idempotently again).
FLINK_CHECKPOINT_MS = 10_000


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What ``submit`` and ``status`` need to know about one pipeline."""

    module: str
    group: str
    topics: tuple[str, ...]


#: The pipelines ``submit`` can start: module, default consumer group, topics read.
PIPELINES: dict[str, PipelineSpec] = {
    "fanout": PipelineSpec("pipelines.fanout", "feedbeam-fanout",
                           ("post-events", "follow-events")),
    "features": PipelineSpec("pipelines.features", "feedbeam-features",
                             ("engagement-events", "post-events")),
    "stories": PipelineSpec("pipelines.stories", "feedbeam-stories", ("story-events",)),
    "ranking": PipelineSpec("pipelines.ranking", "feedbeam-ranking",
                            ("post-events", "engagement-events", "follow-events")),
}


def jobs_dir(settings: StackSettings) -> Path:
    return Path(settings.state_dir) / "jobs"


# ---------------------------------------------------------------- building the command


def _flag_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


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
        if not has_flag(beam_args, "--job_endpoint") and not flink_ready(settings):
            raise UserFacingError(f"the Flink job server is not answering at {endpoint}; "
                                  "start it with `feedbeam infra up flink`")
        out = ["--runner=FlinkRunner"]
        if not has_flag(beam_args, "--job_endpoint"):
            out.append(f"--job_endpoint={endpoint}")
        if not has_flag(beam_args, "--environment_type"):
            out.append("--environment_type=LOOPBACK")
        if not has_flag(beam_args, "--checkpointing_interval"):
            # Without checkpoints Flink never finalizes bundles: no offset is committed.
            out.append(f"--checkpointing_interval={FLINK_CHECKPOINT_MS}")
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


def stack_defaults(module: str, settings: StackSettings, beam_args: list[str]) -> list[str]:
    """The local stack's addresses for the options ``module`` declares and the user left out."""
    from apache_beam.options.pipeline_options import PipelineOptions

    importlib.import_module(module)  # registers its options classes
    known = set(PipelineOptions([]).get_all_options(retain_unknown_options=False))
    candidates = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "redis_url": settings.redis_url,
        "cassandra_host": settings.host,
        "cassandra_port": str(settings.cassandra_port),
    }
    return [f"--{name}={value}" for name, value in candidates.items()
            if name in known and not has_flag(beam_args, f"--{name}")]


def build_command(pipeline: str, runner: str, settings: StackSettings,
                  beam_args: list[str]) -> list[str]:
    """The argv of ``python -m pipelines.<pipeline>`` for ``runner``."""
    spec = PIPELINES.get(pipeline)
    if spec is None:
        raise UserFacingError(f"unknown pipeline {pipeline!r}; choose one of "
                              + ", ".join(PIPELINES))
    try:
        defaults = stack_defaults(spec.module, settings, beam_args)
    except ModuleNotFoundError as exc:
        raise UserFacingError(f"pipeline {pipeline!r} cannot be loaded ({exc})") from None
    streaming = [] if (has_flag(beam_args, "--replay_ranges")
                       or has_flag(beam_args, "--streaming")) else ["--streaming"]
    return [sys.executable, "-m", spec.module, *runner_args(runner, settings, beam_args),
            *streaming, *defaults, *beam_args]


# ---------------------------------------------------------------- job records


@dataclasses.dataclass
class JobRecord:
    job_id: str
    pipeline: str
    runner: str
    pid: int
    started_at: str
    log_path: str
    group: str
    topics: list[str]
    argv: list[str]

    def path(self, settings: StackSettings) -> Path:
        return jobs_dir(settings) / f"{self.job_id}.json"

    def save(self, settings: StackSettings) -> None:
        path = self.path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        tmp.replace(path)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


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
    return _flag_value(beam_args, "--consumer_group") or PIPELINES[pipeline].group


def effective_topics(pipeline: str, beam_args: list[str]) -> list[str]:
    prefix = _flag_value(beam_args, "--topic_prefix") or ""
    return [prefix + t for t in PIPELINES[pipeline].topics]


# ---------------------------------------------------------------- commands


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="start a pipeline on a Beam runner",
        description=__doc__.split("\n\n")[0],
        epilog="Every option submit does not know is passed to the pipeline and to Beam.")
    p.add_argument("pipeline", choices=sorted(PIPELINES))
    p.add_argument("--runner", choices=RUNNERS, default="prism")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; see `feedbeam status`, stop with `feedbeam cancel`")
    p.add_argument("--print-only", action="store_true",
                   help="print the command instead of running it")
    p.add_argument("beam_args", nargs=argparse.REMAINDER,
                   help="pipeline and Beam options (passed through)")
    p.set_defaults(handler=run_submit)

    s = subparsers.add_parser("status", help="running jobs, consumer lag and throughput")
    s.add_argument("--interval", type=float, default=2.0,
                   help="seconds between the two offset samples that give events/s")
    s.add_argument("--group", action="append", default=[],
                   help="also show this consumer group (repeatable)")
    s.set_defaults(handler=run_status)

    c = subparsers.add_parser("cancel", help="stop a job started by `feedbeam submit`")
    c.add_argument("job_id", help="as `feedbeam status` lists it, or a pipeline name for all of its jobs")
    c.set_defaults(handler=run_cancel)


def split_own_flags(args: argparse.Namespace) -> list[str]:
    """Take ``--runner``, ``--detach`` and ``--print-only`` out of the passed-through
    options (argparse leaves everything after the pipeline name there) onto ``args``."""
    rest: list[str] = []
    items = iter(args.beam_args)
    for a in items:
        if a == "--":
            continue
        if a in ("--detach", "--print-only"):
            setattr(args, a[2:].replace("-", "_"), True)
        elif a == "--runner" or a.startswith("--runner="):
            value = a.split("=", 1)[1] if "=" in a else next(items, None)
            if value not in RUNNERS:
                raise UserFacingError(f"--runner must be one of {', '.join(RUNNERS)}, "
                                      f"not {value!r}")
            args.runner = value
        else:
            rest.append(a)
    return rest


def run_submit(args: argparse.Namespace, settings: StackSettings) -> int:
    beam_args = split_own_flags(args)
    argv = build_command(args.pipeline, args.runner, settings, beam_args)
    if args.print_only:
        print(" ".join(argv))
        return 0
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
    record = JobRecord(job_id, args.pipeline, args.runner, process.pid,
                       dt.datetime.now().isoformat(timespec="seconds"), str(log_path),
                       effective_group(args.pipeline, beam_args),
                       effective_topics(args.pipeline, beam_args), argv[1:])
    record.save(settings)
    if args.detach:
        time.sleep(2.0)
        if process.poll() is not None:
            record.path(settings).unlink(missing_ok=True)
            raise UserFacingError(f"{job_id} exited at once (code {process.returncode}); "
                                  f"its log is {log_path}")
        print(f"{job_id} started on {args.runner} (pid {process.pid}); log {log_path}\n"
              f"  feedbeam status        # lag and throughput\n"
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
            try:
                os.kill(pid, 0)
                gone = os.waitpid(pid, os.WNOHANG)[0] == pid  # reaps our own child
            except ProcessLookupError:
                gone = True
            except ChildProcessError:
                gone = False  # alive, and not our child
            if gone:
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


def run_cancel(args: argparse.Namespace, settings: StackSettings) -> int:
    jobs = [j for j in load_jobs(settings) if args.job_id in (j.job_id, j.pipeline)]
    if not jobs:
        raise UserFacingError(f"no job {args.job_id!r}; `feedbeam status` lists them")
    for job in jobs:
        gone = stop_process_group(job.pid) if job.alive() else True
        if not gone:
            raise UserFacingError(f"{job.job_id} (pid {job.pid}) did not stop")
        job.path(settings).unlink(missing_ok=True)
        print(f"{job.job_id} stopped")
    return 0


# ---------------------------------------------------------------- status


def run_status(args: argparse.Namespace, settings: StackSettings) -> int:
    if not kafka_ready(settings):
        raise UserFacingError(f"Kafka is not answering at {settings.kafka_bootstrap}; "
                              "start the stack with `feedbeam infra up`")
    jobs = load_jobs(settings)
    print("jobs")
    if not jobs:
        print("  none started by `feedbeam submit` (groups below may still have lag)")
    for job in jobs:
        state = "running" if job.alive() else "EXITED (see its log)"
        print(f"  {job.job_id:<28} {job.pipeline:<9} {job.runner:<7} pid {job.pid:<7} "
              f"{state}, since {job.started_at}\n      log {job.log_path}")
    groups: dict[str, list[str]] = {}
    for job in jobs:
        groups.setdefault(job.group, job.topics)
    for name, spec in PIPELINES.items():
        groups.setdefault(spec.group, list(spec.topics))
    for extra in args.group:
        groups.setdefault(extra, sorted({t for s in PIPELINES.values() for t in s.topics}))
    # Topics a group names that do not exist (yet) are left out, not an error.
    first = {g: group_lag(settings.kafka_bootstrap, g, t, missing_ok=True)
             for g, t in groups.items()}
    time.sleep(max(args.interval, 0.0))
    second = {g: group_lag(settings.kafka_bootstrap, g, t, missing_ok=True)
              for g, t in groups.items()}
    print(f"consumer groups (lag = end - committed offset; rates over {args.interval:.0f}s)")
    for group, parts in second.items():
        if not parts or all(p.committed is None for p in parts):
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
