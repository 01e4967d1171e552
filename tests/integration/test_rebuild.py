"""``feedbeam rebuild``: Redis emptied after the fan-out wrote it, refilled from Cassandra.

The fan-out transform applies a small scenario (pushes, a celebrity, an
unfollow, a delete, an inactive reader) to the real Redis and Cassandra; the
test snapshots every Redis key, deletes them all (the "loss"), runs the CLI
and compares. Edge-version entries of edges that no longer exist cannot come
back (Cassandra deletes an unfollowed edge), so those are compared for the
live edges only.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines.fanout_logic import DAY_MS, FanoutPolicy
from tests.integration.fanout_events import U, create, delete, follow
from tests.integration.test_fanout import REPO
from tests.integration.test_fanout_pipeline import run_events, stores  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def _views(dump: dict) -> dict:
    """The dump without edge-version hashes (compared separately)."""
    return {k: v for k, v in dump.items() if ":edges_" not in k}


def test_rebuild_restores_what_the_pipeline_wrote(stack, stores, redis_client, key_prefix,
                                                  keyspace):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=3, timeline_cap=10)
    redis.set_last_read(4, T0 - 40 * DAY_MS)
    cassandra.set_last_read(4, T0 - 40 * DAY_MS)
    events = ([follow(u, 100, T0 + u) for u in (1, 2, 4)] + [follow(1, 200, T0), follow(5, 200, T0)]
              + [follow(u, 300, T0 + u) for u in (1, 2, 3, 5)]            # 300: a celebrity
              + [create(p, 100 if p % 2 else 200, T0 + 100 + p) for p in range(1, 8)]
              + [create(50, 300, T0 + 150), follow(5, 200, T0 + 300, U),
                 delete(3, 100, T0 + 103, T0 + 400)])
    run_events(config, policy, events)
    before = redis.dump()
    assert any(":feed:" in k for k in before) and any(":post:" in k for k in before)

    keys = list(redis_client.scan_iter(match=f"{key_prefix}:*", count=1000))
    redis_client.delete(*keys)
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "rebuild", "--key-prefix", key_prefix,
         "--keyspace", keyspace, "--feed-cap", "3", "--timeline-cap", "10", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rebuilt graph" in done.stdout

    after = redis.dump()
    assert _views(after) == _views(before)
    for author in (100, 200, 300):
        edges_before = before[redis.keys.follower_edges(author)]
        edges_after = after[redis.keys.follower_edges(author)]
        live = {str(u) for u in redis.followers(author)}
        assert {f: v for f, v in edges_before.items() if f in live} == edges_after


def test_rebuild_rejects_unknown_views(stack):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "rebuild", "--views", "feeds,nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown view(s) nope" in done.stderr
