"""``feedbeam submit``'s command building: runners, pass-through options, stack defaults."""
from __future__ import annotations

import argparse
import dataclasses
import sys

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
                              beam_args=list(beam_args))


def test_own_flags_are_taken_out_of_the_passed_through_options():
    args = _args("--push_threshold", "500", "--runner", "flink", "--detach", "--",
                 "--feed_cap=200", "--print-only")
    assert submit.split_own_flags(args) == ["--push_threshold", "500", "--feed_cap=200"]
    assert (args.runner, args.detach, args.print_only) == ("flink", True, True)
    with pytest.raises(UserFacingError, match="--runner must be one of"):
        submit.split_own_flags(_args("--runner=spark"))


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

