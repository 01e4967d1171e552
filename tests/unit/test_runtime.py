"""``pipelines.runtime.runner_flags``: the runner flags every pipeline's run() adds."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from pipelines.runtime import (FLINK_RESTART_DELAY_MS, FLINK_RESTARTS, pipeline_options,
                               runner_flags)

FINISH = "--finish_bundle_before_checkpointing"
RESTARTS = ["--number_of_execution_retries=10", "--execution_retry_delay=5000"]


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


def test_the_restart_budget_outlasts_a_lost_taskmanager():
    """Until the JobManager drops a killed TaskManager (its heartbeat timeout), a
    restart may be scheduled on its slots and fail again: the restarts must last
    several timeouts, or a kill -9 fails the job for good."""
    config = (Path(__file__).parents[2] / "infra" / "flink-cluster.yaml").read_text()
    timeout_ms = int(re.search(r"^heartbeat\.timeout:\s*(\d+)", config, re.M).group(1))
    assert FLINK_RESTARTS * FLINK_RESTART_DELAY_MS >= 3 * timeout_ms


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


# ---------------------------------------------------------------- command lines

import logging  # noqa: E402

from apache_beam.portability.api import beam_job_api_pb2  # noqa: E402

from pipelines import fanout, stories  # noqa: E402
from pipelines.common import module_main  # noqa: E402
from pipelines.runtime import (  # noqa: E402
    OptionsError,
    answer_empty_finalizations,
    beam_spelling,
    lengthen_grpc_waits,
    check_options,
    options_help,
)

_INT = beam_job_api_pb2.PipelineOptionType.INTEGER
_BOOL = beam_job_api_pb2.PipelineOptionType.BOOLEAN
#: What a Flink job server lists (a few of its 116 options).
_FLINK = (("checkpointing_interval", _INT, "-1"), ("parallelism", _INT, "-1"),
          ("finish_bundle_before_checkpointing", _BOOL, "false"))


def test_dashed_options_are_read_under_beams_names():
    assert beam_spelling(["--topic-prefix", "t1.", "--push-threshold=5", "--streaming",
                          "-1", "--job_endpoint=a-b:1"]) == [
        "--topic_prefix", "t1.", "--push_threshold=5", "--streaming", "-1",
        "--job_endpoint=a-b:1"]
    assert check_options(fanout, ["--consumer-group", "g"]).args == ["--consumer_group", "g"]


def test_a_misspelled_option_is_refused_naming_the_nearest_one():
    with pytest.raises(OptionsError, match=r"unknown option --topicprefix \(did you mean "
                                           r"--topic-prefix\?\).*Nothing was started"):
        check_options(fanout, ["--push_threshold", "5", "--topicprefix", "t1."])
    with pytest.raises(OptionsError, match=r"--redis-prefix \(did you mean --redis-key-prefix"):
        check_options(fanout, ["--redis_prefix=t1"])
    with pytest.raises(OptionsError, match="unexpected argument 'stray'"):
        check_options(fanout, ["--push_threshold", "5", "stray"])
    with pytest.raises(OptionsError, match="invalid int value: 'many'"):
        check_options(fanout, ["--push_threshold", "many"])


def test_an_option_of_another_pipeline_is_unknown_to_this_one():
    assert check_options(fanout, ["--replay_ranges={}"]).args == ["--replay_ranges={}"]
    with pytest.raises(OptionsError, match="unknown option --replay-ranges"):
        check_options(stories, ["--replay_ranges={}"])


@pytest.mark.parametrize("args", [
    ["--runner=PrismRunner", "--job_endpoint=127.0.0.1:8073", "--environment_type=LOOPBACK",
     "--streaming", "--prism_location=/x/prism", "--job_name=t1", "--experiments=a",
     "--experiments=b", "--job_server_timeout=60", "--sdk_worker_parallelism=2"],
    ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/t",
     "--setup_file=/x/setup.py", "--max_num_workers=4", "--save_main_session"],
    ["--runner=FlinkRunner", "--flink_master=jm:8081", "--parallelism=4",
     "--max_parallelism=8", "--flink_version=1.19"],
    ["--runner=FnApiRunner", "--direct_num_workers=2", "--replay_ranges={}"],
])
def test_beams_own_options_are_known(args):
    assert check_options(fanout, args, describe=lambda endpoint: None).args == args


def test_flink_options_come_from_its_job_server():
    asked = []

    def describe(endpoint):
        asked.append(endpoint)
        return _FLINK

    flink = ["--runner=FlinkRunner", "--job_endpoint=jm:8099"]
    checked = check_options(fanout, [*flink, "--checkpointing-interval", "2000",
                                     "--finish_bundle_before_checkpointing"], describe=describe)
    assert checked.args[2:] == ["--checkpointing_interval", "2000",
                                "--finish_bundle_before_checkpointing"]
    assert checked.unchecked == [] and asked == ["jm:8099"]
    with pytest.raises(OptionsError, match=r"--checkpointing-intervall \(did you mean "
                                           r"--checkpointing-interval\?\)"):
        check_options(fanout, [*flink, "--checkpointing_intervall=2000"], describe=describe)
    with pytest.raises(OptionsError, match="invalid int value"):
        check_options(fanout, [*flink, "--checkpointing_interval=soon"], describe=describe)


def test_without_the_runners_list_only_near_misses_of_our_options_are_refused():
    flink = ["--runner=FlinkRunner", "--job_endpoint=jm:8099"]
    checked = check_options(fanout, [*flink, "--checkpointing_interval=2000"],
                            describe=lambda endpoint: None)
    assert checked.unchecked == ["--checkpointing_interval"]
    assert "jm:8099 did not list the flink runner's options" in checked.why
    with pytest.raises(OptionsError, match="did you mean --topic-prefix"):
        check_options(fanout, [*flink, "--topic_prefx=t1."], describe=lambda endpoint: None)


def test_help_lists_the_pipelines_options_with_their_defaults():
    text = options_help(fanout, "python -m pipelines.fanout")
    for section in ("FanoutOptions", "StoreOptions", "ReplayOptions", "KafkaReadOptions"):
        assert f"\n{section}:" in text
    assert text.index("FanoutOptions:") < text.index("StoreOptions:")
    flat = " ".join(text.split())
    for shown in ("--push-threshold PUSH_THRESHOLD", "(default: 10000)",
                  "--redis-key-prefix REDIS_KEY_PREFIX", "(default: fb)",
                  "--cassandra-keyspace CASSANDRA_KEYSPACE", "(default: feedbeam)",
                  "--topic-prefix TOPIC_PREFIX", "--consumer-group CONSUMER_GROUP",
                  "(default: feedbeam-<pipeline>)", "--kafka-bootstrap", "--replay-ranges JSON",
                  "--consumer-group t1-fanout"):
        assert shown in flat, shown
    assert "--push_threshold" not in text
    assert "--replay-ranges" not in options_help(stories, "python -m pipelines.stories")


def test_module_main_prints_help_and_refuses_typos_before_running(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(fanout, "run", ran.append)
    assert module_main("pipelines.fanout", ["--help"]) == 0
    assert "--push-threshold" in capsys.readouterr().out and ran == []
    assert module_main("pipelines.fanout", ["--topicprefix", "t1."]) == 2
    assert "did you mean --topic-prefix" in capsys.readouterr().err and ran == []
    assert module_main("pipelines.fanout", ["--topic-prefix", "t1."]) == 0
    assert ran == [["--topic_prefix", "t1."]]


# ---------------------------------------------------------------- Prism's empty finalizations


def test_a_bundle_with_nothing_to_finalize_is_answered_in_one_log_line(caplog):
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import sdk_worker

    cache = sdk_worker.BundleProcessorCache(frozenset(), None, None, {})
    try:
        worker = sdk_worker.SdkWorker(cache)
        # A bundle that registered no callback is released at once: the SDK knows it
        # as not running, which is where Prism's FinalizeBundle finds it.
        cache.activate("bundle-1")
        request = beam_fn_api_pb2.FinalizeBundleRequest(instruction_id="bundle-1")
        original = getattr(sdk_worker.SdkWorker.finalize_bundle, "__wrapped__",
                           sdk_worker.SdkWorker.finalize_bundle)
        with pytest.raises(RuntimeError, match="not in a finalizable state"):
            original(worker, request, "fin-1")

        answer_empty_finalizations()
        answer_empty_finalizations()  # idempotent: one wrapper
        assert not hasattr(sdk_worker.SdkWorker.finalize_bundle.__wrapped__, "__wrapped__")
        with caplog.at_level(logging.INFO, logger="pipelines.runtime"):
            response = sdk_worker.SdkWorker.finalize_bundle(worker, request, "fin-2")
        assert response.instruction_id == "fin-2" and not response.error
        assert response.HasField("finalize_bundle")
        assert [r.getMessage() for r in caplog.records] == [
            "bundle bundle-1 registered nothing to finalize (a stage of the Kafka source "
            "that does not read, which Prism finalizes too): answered as done"]
        # Anything else stays an error: a bundle the SDK never heard of.
        unknown = sdk_worker.SdkWorker.finalize_bundle(
            worker, beam_fn_api_pb2.FinalizeBundleRequest(instruction_id="nope"), "fin-3")
        assert "Unknown process bundle id nope" in unknown.error
    finally:
        cache.shutdown()


# ---------------------------------------------------------------- gRPC's idle wake-ups


def _wait_for_an_answer_after(seconds: float, slice_s: float) -> tuple[float, list[float]]:
    """A thread blocked in gRPC's wait with ``slice_s`` slices, answered after
    ``seconds``: how long it waited and the slices it slept."""
    import grpc._common

    condition = threading.Condition()
    answered, wakes = [], []

    def wait(timeout):
        wakes.append(timeout)
        condition.wait(timeout=timeout)

    def answer():
        time.sleep(seconds)
        with condition:
            answered.append(True)
            condition.notify_all()

    previous = lengthen_grpc_waits(slice_s)
    try:
        threading.Thread(target=answer).start()
        started = time.monotonic()
        with condition:
            grpc._common.wait(wait, lambda: bool(answered))
        return time.monotonic() - started, wakes
    finally:
        grpc._common.MAXIMUM_WAIT_TIMEOUT = previous


def test_a_thread_blocked_on_grpc_sleeps_a_whole_slice_yet_wakes_at_once_when_answered():
    # The slice is long enough that a busy CI machine stalling the process for
    # seconds (once 10 s, with the integration suite's servers still up) cannot
    # pass for it: the answer woke the thread, not the end of the 60 s slice.
    waited, wakes = _wait_for_an_answer_after(0.3, 60.0)
    assert 0.25 <= waited < 30.0
    assert wakes == [60.0]
    waited, wakes = _wait_for_an_answer_after(0.55, 0.1)  # gRPC's own slices
    # A loaded machine may stretch a slice, so it is "more than one", not "five".
    assert len(wakes) >= 2 and set(wakes) == {0.1}


def test_grpc_waits_refuse_a_slice_that_never_blocks():
    with pytest.raises(ValueError):
        lengthen_grpc_waits(0)
