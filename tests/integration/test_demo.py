"""``feedbeam demo`` end to end with a tiny workload on isolated topics, keys and keyspace.

The demo trains a small ranker, runs every pipeline on Prism until it has
applied the workload and starts the API; the test then checks the printed
summary against the generator's own graph, and that the ranked feed the API
returned was scored by the model the demo promoted.
"""
from __future__ import annotations

import re
import uuid

import pytest

from jobs.cli import build_parser, main
from jobs.demo import PROBE_WAIT_S, DemoWorkload
from jobs.generate import config_from_args
from jobs.topics import feed_topics
from jobs.workload import Workload
from schemas.events import FollowEvent, FollowKind

pytestmark = pytest.mark.integration

TINY = ["--users", "300", "--avg-following", "8", "--celebrities", "1",
        "--push-threshold", "50", "--posts-per-day", "12"]


def _final_following(workload: Workload) -> dict[int, set[int]]:
    """Who follows whom after every follow event of the workload (newest per edge wins)."""
    latest: dict[tuple[int, int], FollowEvent] = {}
    for _, _, e in workload.events():
        if isinstance(e, FollowEvent):
            pair = (e.follower_id, e.followee_id)
            if pair not in latest or (e.event_time, e.kind is FollowKind.UNFOLLOW) >= \
                    (latest[pair].event_time, latest[pair].kind is FollowKind.UNFOLLOW):
                latest[pair] = e
    out: dict[int, set[int]] = {}
    for (follower, followee), e in latest.items():
        if e.kind is FollowKind.FOLLOW:
            out.setdefault(follower, set()).add(followee)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_topics(stack):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    yield prefix
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for future in admin.delete_topics(feed_topics(prefix), operation_timeout=30).values():
        try:
            future.result(timeout=60)
        except Exception:  # a topic the demo never got to create
            pass


def test_demo_materializes_feeds_of_followed_authors(stack, demo_topics, keyspace, key_prefix,
                                                     capsys, tmp_path):
    group = f"g-{uuid.uuid4().hex[:8]}"
    rc = main(["demo", *TINY, "--partitions", "2", "--samples", "1", "--timeout", "420",
               "--topic-prefix", demo_topics, "--redis-key-prefix", key_prefix,
               "--keyspace", keyspace, "--group", group, "--exit",
               "--api-port", str(_free_port()), "--model-dir", str(tmp_path / "models"),
               "--train-users", "500", "--train-days", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out + captured.err
    for log in (stack.state_dir / "logs").glob(f"{group}*.log"):
        log.unlink(missing_ok=True)
    # Every pipeline of this build ran and caught up; the API answered the samples.
    from jobs.demo import available_pipelines

    for name in available_pipelines():
        assert f"{name} caught up in" in out, out
    ranked = re.search(r"ranked feed of user \d+ \(GET \S+ -> 200\):\n\s+(.*)\n", out)
    assert ranked, out
    # The demo trained and promoted a model, and the ranking pipeline scored with it.
    version = re.search(r"promoted: latest -> (\S+)", out)
    assert version, out
    assert '"items":[]' not in ranked[1], ranked[1]
    assert f'"model_version":"{version[1]}"' in ranked[1], ranked[1]
    assert re.search(r"story tray of user \d+ \(GET \S+ -> 200\)", out), out
    assert "curl -s -H \"Authorization: Bearer $TOKEN\"" in out

    # The live posts reached every follower's feed, each within the probe's wait.
    probe = re.search(r"freshness probe: (\d+) posts produced now.*: p50 ([\d,]+) ms, max "
                      r"([\d,]+) ms\n", out)
    assert probe and int(probe[1]) > 0, out
    assert int(probe[3].replace(",", "")) < PROBE_WAIT_S * 1000
    materialized = int(re.search(r"home feeds in Redis: ([\d,]+) of", out)[1].replace(",", ""))
    assert materialized > 0
    rows = int(re.search(r"home_feed_by_user: ([\d,]+) rows", out)[1].replace(",", ""))
    assert rows > 0

    # Rebuild the workload the demo generated (its --start is printed) and
    # check the sample feed against the graph.
    start = int(re.search(r"--start (\d+)", out)[1])
    d = DemoWorkload()
    args = build_parser().parse_args(
        ["generate", *DemoWorkload(users=300, avg_following=8, celebrities=1, push_threshold=50,
                                   posts_per_day=12, seed=d.seed).generate_args(start)])
    following = _final_following(Workload(config_from_args(args)))
    sample = re.search(r"home feed of user (\d+) \(follows (\d+) accounts.*?\n((?:     .*\n)+)",
                       out)
    assert sample, out
    user = int(sample[1])
    assert int(sample[2]) == len(following[user])
    authors = [int(a) for a in re.findall(r"by user (\d+)", sample[3])]
    assert authors, sample[0]
    assert set(authors) <= following[user], (user, authors, sorted(following[user]))
    assert "caught up in" in out and "timeline of celebrity" in out


def test_a_sigterm_stops_the_jobs_the_demo_started(stack, demo_topics, keyspace, key_prefix,
                                                   tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from jobs.demo import available_pipelines

    out_path = tmp_path / "demo.out"
    with open(out_path, "w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "demo", *TINY, "--partitions", "1",
             "--skip-generate", "--topic-prefix", demo_topics, "--redis-key-prefix", key_prefix,
             "--keyspace", keyspace, "--group", f"g-{uuid.uuid4().hex[:8]}", "--api-port", "0",
             "--model-dir", str(tmp_path / "models"), "--train-users", "500",
             "--train-days", "2"],
            stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "FEEDBEAM_STATE_DIR": str(stack.state_dir)})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(pids) < len(available_pipelines()):
            assert demo.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.5)
            started = re.search(r"^   started (.*)$", out_path.read_text(), re.MULTILINE)
            pids = [int(p) for p in re.findall(r"\w+ \(pid (\d+)\)", started[1])] if started else []
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=180) == 130, out_path.read_text()  # "interrupted"
        # Every job it started was stopped (and reaped) before it exited.
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for pid in pids:  # whatever a failure left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if demo.poll() is None:
            demo.kill()
            demo.wait()
