"""The stories pipeline's plain parts: options, event runs, timer commands and steps."""
from __future__ import annotations

import json

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.stories import (
    StoriesOptions,
    StoryStoreConfig,
    _runs,
    expired_message,
    expiry_command,
)
from pipelines.stories_logic import StoryPolicy, timer_step
from schemas.events import StoryEvent, StoryEventKind
from schemas.stories import ExpiryCommand, StoryExpired, StoryOutcome

P, V, D = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def test_options_parse_beside_the_fanout_options():
    options = PipelineOptions(["--redis_url=redis://h:1/2", "--grace_s=30",
                               "--max_story_life_h=2", "--cassandra_keyspace=ks"])
    assert options.get_all_options()["redis_url"] == "redis://h:1/2"
    stories = options.view_as(StoriesOptions)
    assert stories.stores() == StoryStoreConfig(
        "redis://h:1/2", "fb", "127.0.0.1", 9042, "ks", StoryPolicy(30_000, 7_200_000))


def test_runs_keep_order_and_group_consecutive_kinds():
    events = [StoryEvent(str(i), i, kind, 1, 1) for i, kind in enumerate([P, P, V, D, D, V, P])]
    runs = _runs(events)
    assert [(kind, [e.event_id for e in run]) for kind, run in runs] == [
        (P, ["0", "1"]), (V, ["2"]), (D, ["3", "4"]), (V, ["5"]), (P, ["6"])]


def test_expiry_commands_of_outcomes():
    def outcome(action):
        return StoryOutcome("e", action, 5, 2, 1000, 10)

    assert expiry_command(outcome("published")) == ExpiryCommand(5, 2, 1000, False)
    assert expiry_command(outcome("deleted")) == ExpiryCommand(5, 2, 1000, True)
    for action in ("tombstoned", "expired", "beyond_horizon", "viewed", "view_unknown"):
        assert expiry_command(outcome(action)) is None


def test_timer_steps():
    arm, cancel = ExpiryCommand(5, 2, 1000), ExpiryCommand(5, 2, 1000, cancel=True)
    assert timer_step(arm, None, False) == "arm"
    assert timer_step(arm, (2, 1000), False) == "unchanged"
    assert timer_step(arm, (2, 900), False) == "arm"
    assert timer_step(arm, None, True) == "ignore"         # arm after delete
    assert timer_step(cancel, (2, 1000), False) == "cancel"
    assert timer_step(cancel, None, True) == "cancel"


def test_expired_message_is_json_keyed_by_author():
    msg = expired_message("t.stories-expired", StoryExpired(5, 2, 1000, 1500))
    assert (msg.topic, msg.key, msg.timestamp_ms) == ("t.stories-expired", b"2", 1500)
    assert json.loads(msg.value) == {"story_id": 5, "author_id": 2, "expires_at": 1000,
                                     "removed_at": 1500}
