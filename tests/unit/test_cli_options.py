"""One name per option across the ``feedbeam`` commands, dashes or underscores alike."""
from __future__ import annotations

import pytest

from jobs import cli


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flag", ["--topic-prefix", "--topic_prefix", "--prefix"])
def test_topics_take_the_topic_prefix_under_every_spelling(flag):
    assert parse("topics", "create", flag, "t1.").prefix == "t1."
    assert parse("topics", "list", flag, "t1.").prefix == "t1."


def test_topics_create_makes_every_dead_letter_topic_a_pipeline_writes():
    # ApplyInBatches dead-letters an element that is not an event to
    # <prefix><namespace>.dlq (the features' store sinks), the fan-out's durable
    # step to <prefix>fanout-durable.dlq, the stories' to <prefix>stories-durable.dlq:
    # each must exist before a permanent error.
    from jobs.topics import feed_topics
    from pipelines import common, fanout, features_sinks
    from schemas.events import TOPICS, dlq_topic, dlq_topics

    names = feed_topics("t1.")
    assert len(names) == len(set(names))
    assert {"t1." + t for t in TOPICS} <= set(names)
    assert set(dlq_topics("t1.")) <= set(names)
    assert {dlq_topic("t1." + t) for t in TOPICS} <= set(names)
    assert dlq_topic("t1." + features_sinks.NAMESPACE) in names
    assert dlq_topic("t1." + fanout.DURABLE_LOG_TOPIC) in names
    assert dlq_topic("t1." + common.STORIES_DURABLE_LOG_TOPIC) in names
    assert "t1.feedbeam.features.dlq" in names and "t1.fanout-durable.dlq" in names


@pytest.mark.parametrize("argv", [
    ["--redis-key-prefix", "r1", "--cassandra-keyspace", "k1"],
    ["--redis_key_prefix", "r1", "--cassandra_keyspace", "k1"],
    ["--key-prefix", "r1", "--keyspace", "k1"],  # the names before
])
def test_rebuild_reads_the_names_the_pipelines_use(argv):
    args = parse("rebuild", *argv)
    assert (args.key_prefix, args.keyspace) == ("r1", "k1")


def test_commands_not_written_with_the_new_names_accept_them_too():
    # migrate and serve declare --keyspace / --key-prefix; SPELLINGS adds the one name.
    assert parse("migrate", "--cassandra-keyspace", "k1").keyspace == "k1"
    args = parse("serve", "--jwt-key", "x" * 32, "--cassandra_keyspace", "k1",
                 "--redis-key-prefix", "r1")
    assert (args.keyspace, args.key_prefix) == ("k1", "r1")
    assert parse("generate", "--kafka_bootstrap", "h:1", "--topic_prefix", "t1.").bootstrap \
        == "h:1"
    # An option inside an argument group (replay's range) gets its twin as well.
    args = parse("replay", "post-events", "--from_offset", "3", "--to-offset", "9",
                 "--out", "/tmp/x", "--kafka-bootstrap", "h:1")
    assert (args.from_offset, args.to_offset, args.bootstrap) == (3, 9, "h:1")


def test_status_cancel_and_clean_share_the_scope_options():
    args = parse("status", "fanout", "--topic_prefix", "t1.", "--group", "g1",
                 "--consumer-group", "g2")
    assert (args.target, args.topic_prefix, args.group) == ("fanout", "t1.", ["g1", "g2"])
    args = parse("cancel", "--topic-prefix", "t1.", "--consumer_group", "g1", "--all")
    assert (args.target, args.topic_prefix, args.group, args.all) == (None, "t1.", ["g1"], True)
    args = parse("clean", "--topic-prefix", "t1.", "--group", "g1", "--consumer-group", "g2",
                 "--keyspace", "k1", "--redis-key-prefix", "r1")
    assert (args.topic_prefix, args.groups, args.keyspace, args.key_prefix) == (
        "t1.", ["g1", "g2"], "k1", "r1")


def test_help_shows_each_option_by_its_one_name(capsys):
    with pytest.raises(SystemExit):
        parse("rebuild", "--help")
    out = capsys.readouterr().out
    assert "--redis-key-prefix" in out and "--cassandra-keyspace" in out
    for other in ("--key-prefix", "--redis_key_prefix", "--keyspace ", "--keyspace\n"):
        assert other not in out
    with pytest.raises(SystemExit):
        parse("--help")
    assert "dashes or underscores" in " ".join(capsys.readouterr().out.split())


def test_spellings_put_the_one_name_first():
    assert cli.spellings(("--keyspace",)) == ["--cassandra-keyspace", "--keyspace",
                                              "--cassandra_keyspace"]
    assert cli.spellings(("-n", "--lines")) == ["-n", "--lines"]


def test_only_beams_bigquery_notice_is_kept_off_the_screen():
    import logging

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None)

    notice = "apitools not found, and bigquery client libraries are not available"
    assert not cli._not_beam_gcp_notice(record("root", notice))
    assert cli._not_beam_gcp_notice(record("pipelines.fanout", notice))
    assert cli._not_beam_gcp_notice(record("root", "the fan-out job exited"))
