"""WriteToKafka and WriteDeadLetters against the real Kafka, on DirectRunner and Prism."""
from __future__ import annotations

import uuid

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.io.deadletter import DLQ_NAMESPACE, WriteDeadLetters, read_dead_letters
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from schemas.records import DECODE_STEP, DeadLetter, KafkaRecord

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def _options(runner: str) -> PipelineOptions:
    # "fnapi" is the in-process runner DirectRunner falls back to; naming it
    # spares DirectRunner's attempt to download Prism (no GitHub access here).
    if runner == "prism":
        from infra.settings import StackSettings
        from infra.install import prism_binary

        return PipelineOptions([
            "--runner=PrismRunner",
            f"--prism_location={prism_binary(StackSettings.from_env())}",
            "--environment_type=LOOPBACK",
            # A private job server: the process-wide one may have been set
            # up by an earlier DirectRunner without our --prism_location.
            "--experiments=disable_prism_server_singleton",
        ])
    return PipelineOptions(["--runner=FnApiRunner"])


def _dead_letters(topic: str, n: int) -> list[DeadLetter]:
    values = [b"", None, b"\x00\x00\x00\x00\x63junk", b"\xff" * 300, "ünï".encode()]
    return [
        DeadLetter.of(
            KafkaRecord(topic, partition=i % 3, offset=1000 + i,
                        key=None if i % 4 == 0 else f"k{i}".encode(),
                        value=values[i % len(values)], timestamp_ms=T0 + i),
            DECODE_STEP, reason=("wrong_magic", "too_short", "bad_body")[i % 3],
            error=f"error #{i}: ünïcode ok", failed_at_ms=T0 + 10_000 + i)
        for i in range(n)
    ]


@pytest.mark.parametrize("runner", ["fnapi", "prism"])
def test_write_dead_letters_then_read_them_back(stack, kafka_topic, runner):
    base = kafka_topic(partitions=1)
    dlq = kafka_topic(partitions=2, name=base + ".dlq")
    sent = _dead_letters(base, 25)

    pipeline = beam.Pipeline(options=_options(runner))
    _ = (pipeline
         | "Create" >> beam.Create(sent)
         | "WriteDLQ" >> WriteDeadLetters({"bootstrap.servers": stack.kafka_bootstrap}))
    result = pipeline.run()
    result.wait_until_finish()

    got = read_dead_letters(stack.kafka_bootstrap, dlq, timeout_s=30)
    # Exactly the dead letters written: original bytes and every metadata field.
    assert sorted(got, key=lambda d: d.offset) == sorted(sent, key=lambda d: d.offset)

    counters = {r.key.metric.name: r.committed for r in result.metrics().query(
        MetricsFilter().with_namespace(DLQ_NAMESPACE))["counters"]}
    assert counters["written"] == len(sent)
    assert counters[f"dead_letters_written.{dlq}"] == len(sent)
    assert counters.get("failed", 0) == 0


def test_read_dead_letters_of_an_empty_topic_and_a_missing_one(stack, kafka_topic):
    dlq = kafka_topic(partitions=2, name=kafka_topic(partitions=1) + ".dlq")
    assert read_dead_letters(stack.kafka_bootstrap, dlq, timeout_s=10) == []
    with pytest.raises(LookupError, match="missing"):
        read_dead_letters(stack.kafka_bootstrap, f"t.{uuid.uuid4().hex[:12]}.missing.dlq",
                          timeout_s=10)


@pytest.mark.parametrize("runner", ["fnapi", "prism"])
def test_write_to_a_missing_topic_fails_the_pipeline_naming_the_topic(stack, runner):
    missing = f"t.{uuid.uuid4().hex[:12]}.nope"  # auto-creation is off: never appears
    config = {
        "bootstrap.servers": stack.kafka_bootstrap,
        "message.timeout.ms": 3000,
        "topic.metadata.propagation.max.ms": 1000,
    }
    messages = [KafkaMessage(missing, b"k", b"v%d" % i, (("h", b"1"),)) for i in range(3)]

    pipeline = beam.Pipeline(options=_options(runner))
    _ = (pipeline
         | "Create" >> beam.Create(messages)
         | "Write" >> WriteToKafka(config, max_retries=1, backoff_s=0.1))
    with pytest.raises(Exception, match=missing) as excinfo:
        pipeline.run().wait_until_finish()
    assert "3 message(s)" in str(excinfo.value)
