"""``pipelines.runtime.runner_flags``: the runner flags every pipeline's run() adds."""
from __future__ import annotations

import pytest

from pipelines.runtime import pipeline_options, runner_flags

FINISH = "--finish_bundle_before_checkpointing"
RESTARTS = ["--number_of_execution_retries=3", "--execution_retry_delay=5000"]


@pytest.mark.parametrize("runner", [["--runner=FlinkRunner"], ["--runner", "FlinkRunner"],
                                    ["--runner=flink"]])
def test_flink_with_checkpointing_finishes_bundles_before_the_barrier(runner):
    args = [*runner, "--checkpointing_interval=2000", "--streaming"]
    assert runner_flags(args) == [*args, FINISH, *RESTARTS]
    spaced = [*runner, "--checkpointing_interval", "2000"]
    assert runner_flags(spaced) == [*spaced, FINISH, *RESTARTS]


def test_flink_restarts_are_bounded_unless_the_user_says_otherwise():
    assert runner_flags(["--runner=FlinkRunner"]) == ["--runner=FlinkRunner", *RESTARTS]
    own = ["--runner=FlinkRunner", "--number_of_execution_retries=-1"]
    assert runner_flags(own) == own


@pytest.mark.parametrize("args", [
    ["--runner=FlinkRunner", "--checkpointing_interval=2000", FINISH, *RESTARTS],  # all given
    ["--runner=PrismRunner", "--checkpointing_interval=2000"],       # not Flink's options
    [],
])
def test_other_command_lines_are_left_alone(args):
    assert runner_flags(args) == args


def test_pipeline_options_carry_the_added_flag():
    options = pipeline_options(["--runner=FlinkRunner", "--checkpointing_interval=500"])
    all_options = options.get_all_options(retain_unknown_options=True)
    assert all_options["finish_bundle_before_checkpointing"] is True
