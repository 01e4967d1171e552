"""A minimal streaming job for the Kafka source tests: Kafka -> Redis.

For every record read (the source emits record batches) it appends ``"<partition>:<offset>"`` to the Redis list
``<prefix>:seen:<partition>`` (arrival order) and counts it in the hash
``<prefix>:count`` (so re-reads after a restart are visible). Run as a module
so a test can start it in its own process group and kill it with SIGKILL:

    python -m tests.integration.kafka_to_redis --topic T --redis_prefix P \
        --prism_location ... --kafka_bootstrap ... --consumer_group G
"""
from __future__ import annotations

import argparse
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.io.kafka import KafkaReadOptions, ReadFromKafka


class RecordToRedis(beam.DoFn):
    """Writes each record's coordinates to Redis, one pipelined round trip per bundle."""

    def __init__(self, redis_url: str, prefix: str):
        self._url = redis_url
        self._prefix = prefix

    def setup(self):
        import redis

        self._client = redis.Redis.from_url(self._url)

    def start_bundle(self):
        self._pending = []

    def process(self, batch):
        self._pending.extend(batch.records())

    def finish_bundle(self):
        if not self._pending:
            return
        pipe = self._client.pipeline(transaction=False)
        for r in self._pending:
            pipe.rpush(f"{self._prefix}:seen:{r.partition}", f"{r.partition}:{r.offset}")
            pipe.hincrby(f"{self._prefix}:count", f"{r.partition}:{r.offset}", 1)
        pipe.execute()
        self._pending = []

    def teardown(self):
        self._client.close()


def build(pipeline, topic: str, options: PipelineOptions, redis_url: str, prefix: str):
    config = options.view_as(KafkaReadOptions).source_config(default_group="feedbeam-test")
    return (pipeline
            | "Read" >> ReadFromKafka(config, [topic])
            | "ToRedis" >> beam.ParDo(RecordToRedis(redis_url, prefix)))


def run(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--redis_url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis_prefix", required=True)
    known, beam_args = parser.parse_known_args(argv)
    options = PipelineOptions(beam_args, streaming=True)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, known.topic, options, known.redis_url, known.redis_prefix)
    pipeline.run().wait_until_finish()


if __name__ == "__main__":
    run(sys.argv[1:])
