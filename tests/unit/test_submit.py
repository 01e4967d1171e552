"""``feedbeam submit``'s command building: runners, pass-through options, stack defaults."""
from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest

from infra.settings import StackSettings
from infra.stack import _prism_path, prism_binary
from jobs import submit
from infra.errors import UserFacingError


@pytest.fixture
def settings(tmp_path) -> StackSettings:
    s = dataclasses.replace(StackSettings(), cache_dir=tmp_path / "cache",
                            state_dir=tmp_path / "state", kafka_port=19092, redis_port=16379)
    binary = _prism_path(s)
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
                                ["--redis_url=redis://elsewhere:1/0", "--push_threshold", "5"])
    assert argv[:3] == [sys.executable, "-m", "pipelines.fanout"]
    assert f"--prism_location={prism_binary(settings)}" in argv
    assert "--environment_type=LOOPBACK" in argv and "--streaming" in argv
    assert "--kafka_bootstrap=127.0.0.1:19092" in argv
    assert [a for a in argv if a.startswith("--redis_url")] == ["--redis_url=redis://elsewhere:1/0"]
    assert argv[-2:] == ["--push_threshold", "5"]  # passed through, last


def test_missing_prism_binary_is_a_clear_error(settings):
    prism_binary(settings).unlink()
    with pytest.raises(UserFacingError, match="Prism runner binary is not built"):
        submit.build_command("fanout", "prism", settings, [])


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


def test_lag_of_a_partition_never_committed_is_unknown():
    assert submit.PartitionLag("t", 0, None, 10).lag is None
    assert submit.PartitionLag("t", 0, 4, 10).lag == 6
    assert submit.PartitionLag("t", 0, 12, 10).lag == 0  # end read before the commit

