"""``feedbeam submit``'s command building: runners, pass-through options, stack defaults."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.settings import StackSettings
from infra.install import prism_binary, prism_path
from jobs import submit
from infra.errors import UserFacingError


@pytest.fixture
def settings(tmp_path) -> StackSettings:
    s = dataclasses.replace(StackSettings(), cache_dir=tmp_path / "cache",
                            state_dir=tmp_path / "state", kafka_port=19092, redis_port=16379,
                            prism_job_port=18073)
    binary = prism_path(s)
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"")  # only its presence is checked here
    return s


def _args(*beam_args: str) -> argparse.Namespace:
    return argparse.Namespace(pipeline="fanout", runner="prism", detach=False, print_only=False,
                              nice=0, beam_args=list(beam_args))


def test_own_flags_are_taken_out_of_the_passed_through_options():
    args = _args("--push_threshold", "500", "--runner", "flink", "--detach", "--",
                 "--feed_cap=200", "--print-only", "--nice", "10")
    assert submit.split_own_flags(args) == ["--push_threshold", "500", "--feed_cap=200"]
    assert (args.runner, args.detach, args.print_only, args.nice) == ("flink", True, True, 10)
    with pytest.raises(UserFacingError, match="--runner must be one of"):
        submit.split_own_flags(_args("--runner=spark"))
    with pytest.raises(UserFacingError, match="--nice takes a niceness"):
        submit.split_own_flags(_args("--nice=low"))


def test_a_lowered_priority_covers_the_process_and_its_session_group():
    """``lower_priority`` sets the process's niceness and, where the kernel groups
    sessions (autogroups), the niceness of its session's group: with autogroups a
    process's own niceness only weighs it against its session."""
    from infra.processes import lower_priority

    child = subprocess.Popen(  # a thread of its own besides the main one
        [sys.executable, "-c", "import threading, time; "
         "threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"],
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2:  # its thread runs first
            assert time.monotonic() < deadline, "the child never started its thread"
            time.sleep(0.01)
        grouped = lower_priority(child.pid, 7)
        for tid in os.listdir(f"/proc/{child.pid}/task"):
            assert os.getpriority(os.PRIO_PROCESS, int(tid)) == 7
        autogroup = f"/proc/{child.pid}/autogroup"
        if grouped:
            with open(autogroup) as f:
                assert f.read().split()[-1] == "7"   # "/autogroup-N nice 7"
        else:
            assert not os.path.exists(autogroup)
        with pytest.raises(UserFacingError, match="from 0 to 19"):
            lower_priority(child.pid, -1)
    finally:
        child.kill()
        child.wait()


def test_prism_command_fills_in_the_local_stack_but_never_overrides(settings):
    argv = submit.build_command("fanout", "prism", settings,
                                ["--redis_url=redis://elsewhere:1/0", "--push_threshold", "5",
                                 "--job_endpoint=127.0.0.1:18073"])
    assert argv[:3] == [sys.executable, "-m", "pipelines.fanout"]
    assert "--runner=PrismRunner" in argv and argv.count("--job_endpoint=127.0.0.1:18073") == 1
    assert not any(a.startswith("--prism_location") for a in argv)
    assert "--environment_type=LOOPBACK" in argv and "--streaming" in argv
    assert "--kafka_bootstrap=127.0.0.1:19092" in argv
    assert [a for a in argv if a.startswith("--redis_url")] == ["--redis_url=redis://elsewhere:1/0"]
    assert argv[-3:] == ["--push_threshold", "5", "--job_endpoint=127.0.0.1:18073"]


def test_prism_jobs_go_to_the_shared_job_server_or_fail_clearly_without_it(settings):
    # Nothing listens on the settings' Prism port: no silent private Prism.
    with pytest.raises(UserFacingError, match="Prism job server is not answering at "
                                              "127.0.0.1:18073"):
        submit.build_command("fanout", "prism", settings, [])
    # A private Prism stays possible, by its binary.
    argv = submit.build_command("fanout", "prism", settings,
                                [f"--prism_location={prism_binary(settings)}"])
    assert f"--prism_location={prism_binary(settings)}" in argv
    assert not any(a.startswith("--job_endpoint") for a in argv)


def test_flink_uses_the_given_job_endpoint_and_passes_flink_master(settings):
    argv = submit.build_command("fanout", "flink", settings,
                                ["--job_endpoint=jm:8099", "--flink_master=jm:8081"])
    assert "--runner=FlinkRunner" in argv and "--job_endpoint=jm:8099" in argv
    assert argv.count("--job_endpoint=jm:8099") == 1 and "--flink_master=jm:8081" in argv
    # Offsets are committed at checkpoints: on by default, the user's interval wins.
    assert f"--checkpointing_interval={submit.FLINK_CHECKPOINT_MS}" in argv
    argv = submit.build_command("fanout", "flink", settings,
                                ["--job_endpoint=jm:8099", "--checkpointing_interval=500"])
    assert [a for a in argv if a.startswith("--checkpointing_interval")] == [
        "--checkpointing_interval=500"]


def test_flink_without_a_job_server_is_a_clear_error(settings):
    settings = dataclasses.replace(settings, flink_job_port=1)  # nothing listens there
    with pytest.raises(UserFacingError, match="feedbeam infra up flink"):
        submit.build_command("fanout", "flink", settings, [])


def test_direct_is_bounded_only_and_dataflow_needs_its_project(settings):
    with pytest.raises(UserFacingError, match="bounded work only"):
        submit.build_command("fanout", "direct", settings, [])
    argv = submit.build_command("fanout", "direct", settings, ["--replay_ranges={}"])
    assert "--runner=FnApiRunner" in argv and "--streaming" not in argv
    with pytest.raises(UserFacingError, match="--project, --region, --temp_location"):
        submit.build_command("fanout", "dataflow", settings, [])
    argv = submit.build_command("fanout", "dataflow", settings,
                                ["--project=p", "--region=r", "--temp_location=gs://b/t"])
    assert any(a.startswith("--setup_file=") and a.endswith("setup.py") for a in argv)


def test_group_and_topics_follow_the_options():
    assert submit.effective_group("fanout", []) == "feedbeam-fanout"
    assert submit.effective_group("fanout", ["--consumer_group", "g1"]) == "g1"
    assert submit.effective_topics("fanout", ["--topic_prefix=x."]) == [
        "x.post-events", "x.follow-events"]



# ---------------------------------------------------------------- options


def test_submit_help_lists_the_pipelines_options_and_starts_nothing(settings, monkeypatch,
                                                                    capsys):
    from jobs import cli

    monkeypatch.setattr(submit.subprocess, "Popen", _no_popen)
    monkeypatch.setenv("FEEDBEAM_STATE_DIR", str(settings.state_dir))
    assert cli.main(["submit", "fanout", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("usage: feedbeam submit fanout", "--push-threshold PUSH_THRESHOLD",
                  "(default: 10000)", "--topic-prefix", "--redis-key-prefix",
                  "(default: fb)", "--cassandra-keyspace", "(default: feedbeam)",
                  "submit's own options: --runner"):
        assert shown in out, shown


def test_a_misspelled_option_stops_submit_before_anything_starts(settings, monkeypatch,
                                                                 capsys):
    from jobs import cli

    monkeypatch.setattr(submit.subprocess, "Popen", _no_popen)
    monkeypatch.setenv("FEEDBEAM_STATE_DIR", str(settings.state_dir))
    assert cli.main(["submit", "fanout", "--detach", "--prism_location=/x/prism",
                     "--redis_keyprefix", "t1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --redis-keyprefix (did you mean --redis-key-prefix?)" in err
    assert not submit.jobs_dir(settings).exists()


def _no_popen(*args, **kwargs):
    raise AssertionError("nothing may start")


def test_dashed_options_reach_the_pipeline_under_beams_names(settings):
    argv = submit.build_command("fanout", "prism", settings,
                                ["--prism-location=/x/prism", "--topic-prefix", "t1.",
                                 "--consumer-group=g1", "--redis-url", "redis://h:1/0"])
    assert argv[-5:] == ["--topic_prefix", "t1.", "--consumer_group=g1", "--redis_url",
                         "redis://h:1/0"]
    assert "--prism_location=/x/prism" in argv and "--topic_prefix" in argv
    assert [a for a in argv if a.startswith("--redis_url")] == ["--redis_url"]  # not filled in
    assert "--kafka_bootstrap=127.0.0.1:19092" in argv  # filled in
    assert submit.effective_group("fanout", ["--consumer-group", "g1"]) == "g1"
    assert submit.effective_topics("fanout", ["--topic-prefix=t1."]) == [
        "t1.post-events", "t1.follow-events"]


# ---------------------------------------------------------------- jobs: alive or dead


def test_a_zombie_job_is_dead_and_an_own_child_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_for_state(child.pid, "Z")
    os.kill(child.pid, 0)  # what the old check saw: the pid still answers
    assert not submit.process_alive(child.pid)
    assert submit.proc_stat(child.pid) is None  # reaped


def test_a_zombie_that_is_not_our_child_is_dead(tmp_path):
    # sh starts a child and then becomes a sleep that never reaps it.
    parent = subprocess.Popen(["sh", "-c", "sleep 0 & echo $!; exec sleep 30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        _wait_for_state(pid, "Z")
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert not submit.process_alive(pid)
    finally:
        parent.kill()
        parent.wait()


def test_a_reused_pid_is_not_the_job():
    me = os.getpid()
    ticks = submit.proc_stat(me).start_ticks
    assert submit.process_alive(me, ticks) and submit.process_alive(me)
    assert not submit.process_alive(me, str(int(ticks) + 1))


def _wait_for_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 60  # generous: a loaded CI machine stalls for seconds
    while getattr(submit.proc_stat(pid), "state", "") != state:
        assert time.monotonic() < deadline, f"{pid} never reached state {state}"
        time.sleep(0.02)


# ---------------------------------------------------------------- scoped cancel and status


def _job(settings, job_id: str, prefix: str, group: str, alive: bool = True):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)
    if not alive:
        process.kill()
        process.wait()
    record = submit.JobRecord(job_id, "fanout", "prism", process.pid, "now", "/dev/null",
                              group, [prefix + "post-events"], [], prefix,
                              submit.proc_stat(process.pid).start_ticks if alive else "")
    record.save(settings)
    return record, process


def _scope(target=None, topic_prefix=None, group=(), all=False):
    return argparse.Namespace(target=target, topic_prefix=topic_prefix, group=list(group),
                              all=all)


def test_cancel_stops_only_the_run_named_and_asks_for_all_when_several_match(
        settings, monkeypatch, capsys):
    monkeypatch.setattr(submit.sys.stdin, "isatty", lambda: False)
    a, pa = _job(settings, "fanout-a", "t1.", "g1")
    b, pb = _job(settings, "fanout-b", "t2.", "g2")
    try:
        with pytest.raises(UserFacingError, match=r"2 jobs match:\n  fanout-a .*\n  fanout-b"):
            submit.run_cancel(_scope("fanout"), settings)
        assert a.alive() and b.alive()
        with pytest.raises(UserFacingError, match="say which jobs"):
            submit.run_cancel(_scope(), settings)

        submit.run_cancel(_scope("fanout", topic_prefix="t2."), settings)
        assert a.alive() and not b.alive()
        assert "fanout-b stopped" in capsys.readouterr().out
        assert [j.job_id for j in submit.load_jobs(settings)] == ["fanout-a"]

        c, _ = _job(settings, "fanout-c", "t1.", "g3")
        submit.run_cancel(_scope(topic_prefix="t1.", all=True), settings)
        assert not a.alive() and not c.alive() and submit.load_jobs(settings) == []
    finally:
        for p in (pa, pb):
            p.kill()


def test_cancel_on_a_terminal_asks_before_stopping_several(settings, monkeypatch):
    monkeypatch.setattr(submit.sys.stdin, "isatty", lambda: True)
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    a, pa = _job(settings, "fanout-a", "t1.", "g1")
    b, pb = _job(settings, "fanout-b", "t1.", "g1")
    try:
        with pytest.raises(UserFacingError, match="2 jobs match"):
            submit.run_cancel(_scope(group=["g1"]), settings)
        assert a.alive() and b.alive()
        submit.run_cancel(_scope(group=["g1"]), settings)
        assert not a.alive() and not b.alive()
    finally:
        for p in (pa, pb):
            p.kill()


def test_a_dead_job_is_cancelled_by_removing_its_record(settings, capsys):
    dead, _ = _job(settings, "fanout-dead", "t1.", "g1", alive=False)
    assert not dead.alive()
    submit.run_cancel(_scope("fanout-dead"), settings)
    assert "fanout-dead had already exited; record removed" in capsys.readouterr().out
    assert submit.load_jobs(settings) == []
    with pytest.raises(UserFacingError, match="no job 'fanout-dead'"):
        submit.run_cancel(_scope("fanout-dead"), settings)


def test_status_looks_at_the_groups_and_topics_of_the_run_named(monkeypatch):
    monkeypatch.setattr(submit, "committed_topics",
                        lambda bootstrap, group: ["t9.post-events"] if group == "g9" else [])
    job = submit.JobRecord("fanout-a", "fanout", "prism", 1, "now", "/dev/null", "g1",
                           ["t1.post-events", "t1.follow-events"], [], "t1.")
    everything = submit.groups_to_show(_scope(), [], "b")
    assert everything["feedbeam-fanout"] == ["follow-events", "post-events"]
    prefixed = submit.groups_to_show(_scope(topic_prefix="t1."), [job], "b")
    assert prefixed["g1"] == ["t1.follow-events", "t1.post-events"]
    assert prefixed["feedbeam-stories"] == ["t1.story-events"]
    # A group named: where it committed (asked from Kafka), nothing else.
    assert submit.groups_to_show(_scope(group=["g9"]), [], "b") == {"g9": ["t9.post-events"]}
    # One that never committed: the pipelines' topics under the prefix.
    assert submit.groups_to_show(_scope(topic_prefix="t2.", group=["g2"]), [], "b")["g2"] == \
        sorted({"t2." + t for s in submit.PIPELINES.values() for t in s.topics})
    # The job's durable step reads its own log under its own group: Cassandra's lag.
    stories = submit.groups_to_show(_scope("stories"), [], "b")
    assert stories == {"feedbeam-stories": ["story-events"],
                       "feedbeam-stories-durable": ["stories-durable"]}


def test_cancel_of_a_killed_job_kills_what_is_left_of_its_process_group(settings, capsys):
    # A job whose main process died (SIGKILL) while a child of its session (a private
    # Prism, a worker) lives on.
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    left = int(leader.stdout.readline())
    submit.JobRecord("fanout-k", "fanout", "prism", leader.pid, "now", "/dev/null", "g1", [],
                     [], "", submit.proc_stat(leader.pid).start_ticks).save(settings)
    os.kill(leader.pid, signal.SIGKILL)
    try:
        _wait_for_state(leader.pid, "Z")
        assert submit.process_alive(left)
        submit.run_cancel(_scope("fanout-k"), settings)
        assert "fanout-k had already exited" in capsys.readouterr().out
        deadline = time.monotonic() + 60  # generous: a loaded CI machine stalls for seconds
        while submit.process_alive(left):
            assert time.monotonic() < deadline, "the session's other process still runs"
            time.sleep(0.05)
    finally:
        for pid in (left, leader.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
