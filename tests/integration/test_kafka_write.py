"""WriteToKafka and WriteDeadLetters against the real Kafka, on DirectRunner and Prism."""
from __future__ import annotations

import random
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


def test_dead_letters_too_large_for_kafka_are_written_truncated(stack, kafka_topic):
    import hashlib

    from confluent_kafka.admin import AdminClient, NewTopic

    from jobs.topics import wait_until_visible

    base = kafka_topic(partitions=1)
    roomy = kafka_topic(partitions=1, name=base + ".dlq")
    # A second source topic whose .dlq takes messages of at most 20 KB.
    narrow_base = f"{base}-narrow"
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    narrow = NewTopic(narrow_base + ".dlq", 1, 1, config={"max.message.bytes": "20000"})
    admin.create_topics([narrow])[narrow.topic].result(timeout=60)
    try:
        wait_until_visible(admin, [narrow.topic], timeout_s=60)
        huge = bytes(range(256)) * 6_000          # 1.5 MB: over the producer's 1 MB limit
        # 50 KB that lz4 cannot shrink: over the narrow topic's limit.
        large = b"\x07" + random.Random(3).randbytes(50_000)
        letters = [
            DeadLetter.of(KafkaRecord(base, 0, 1, b"k", huge, T0), DECODE_STEP, "bad_body",
                          "e", failed_at_ms=T0 + 1),
            DeadLetter.of(KafkaRecord(narrow_base, 0, 2, b"k", large, T0), DECODE_STEP,
                          "wrong_magic", "e", failed_at_ms=T0 + 2),
            DeadLetter.of(KafkaRecord(narrow_base, 0, 3, b"k", b"small", T0), DECODE_STEP,
                          "wrong_magic", "e", failed_at_ms=T0 + 3),
        ]
        pipeline = beam.Pipeline(options=_options("fnapi"))
        _ = (pipeline
             | "Create" >> beam.Create(letters)
             | "WriteDLQ" >> WriteDeadLetters({"bootstrap.servers": stack.kafka_bootstrap}))
        result = pipeline.run()
        result.wait_until_finish()

        (big,) = read_dead_letters(stack.kafka_bootstrap, roomy, timeout_s=30)
        assert big.offset == 1 and big.value_size == len(huge)
        assert big.value_sha256 == hashlib.sha256(huge).hexdigest()
        assert 900_000 < len(big.value) < 1_000_000 and huge.startswith(big.value)
        got = {d.offset: d for d in read_dead_letters(stack.kafka_bootstrap, narrow.topic, 30)}
        assert got[2].value_size == len(large) and len(got[2].value) == 1024
        assert got[3].value == b"small" and not got[3].is_truncated
        counters = {r.key.metric.name: r.committed for r in result.metrics().query(
            MetricsFilter().with_namespace(DLQ_NAMESPACE))["counters"]}
        assert counters["resized"] == 1 and counters["written"] == 3
    finally:
        admin.delete_topics([narrow.topic])[narrow.topic].result(timeout=60)


def test_dead_letters_to_a_missing_dlq_topic_fail_saying_how_to_fix_it(stack):
    missing = f"t.{uuid.uuid4().hex[:12]}.post-events"
    letter = DeadLetter.of(KafkaRecord(missing, 0, 1, None, b"x", T0), DECODE_STEP,
                           "wrong_magic", "e")
    config = {"bootstrap.servers": stack.kafka_bootstrap, "message.timeout.ms": 3000,
              "topic.metadata.propagation.max.ms": 1000}
    pipeline = beam.Pipeline(options=_options("fnapi"))
    _ = pipeline | beam.Create([letter]) | WriteDeadLetters(config, max_retries=0)
    with pytest.raises(Exception, match="feedbeam topics create") as excinfo:
        pipeline.run().wait_until_finish()
    assert missing + ".dlq" in str(excinfo.value)
