"""Helpers of the serving tests: the real app on a real port, HTTP calls, a private Redis.

``running_app(config)`` starts ``serving.app.FeedApp`` under uvicorn in a
thread on a free loopback port and stops it afterwards; ``served(server,
args)`` runs ``feedbeam serve`` itself (granian or uvicorn, with the server
limits it sets); ``private_redis()`` starts a throwaway ``redis-server``
(Debian's binary) on a free port, so a test can kill it without touching the
shared Redis, or count the commands a request costs (``command_calls``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import orjson

from serving.app import FeedApp
from serving.auth import issue_token
from serving.config import ServingConfig
from schemas.keys import KeyLayout

JWT_KEY = "test-key-0123456789-0123456789-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float = 30.0, what: str = "condition",
               interval_s: float = 0.05):
    """Poll ``check()`` every ``interval_s`` until it returns something truthy (returned);
    fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class Client:
    """Minimal HTTP client for the tests: ``(status, json)`` per call."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def call(self, method: str, path: str, user: int | None = None, token: str | None = None,
             timeout_s: float = 10.0) -> tuple[int, Any]:
        headers = {}
        if user is not None:
            token = issue_token(JWT_KEY, user)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        content = orjson.loads(body) if body[:1] in (b"{", b"[") else body.decode()
        return status, content

    def get(self, path: str, user: int | None = None, **kw) -> tuple[int, Any]:
        return self.call("GET", path, user, **kw)

    def pages(self, path: str, user: int, limit: int) -> list[dict]:
        """Every page of a feed, following next_cursor."""
        pages, cursor = [], None
        while True:
            sep = "&" if "?" in path else "?"
            query = f"{sep}limit={limit}" + ("" if cursor is None else f"&cursor={cursor}")
            status, body = self.get(path + query, user)
            assert status == 200, body
            pages.append(body)
            cursor = body["next_cursor"]
            if cursor is None:
                return pages
            assert len(pages) < 1000, "pagination does not end"


@contextlib.contextmanager
def running_app(config: ServingConfig) -> Iterator[tuple[Client, FeedApp]]:
    import uvicorn

    app = FeedApp(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop",
                                           http="httptools", lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the API to start")
        yield Client(f"http://127.0.0.1:{port}"), app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


#: Budgets for tests of what the API answers, not how fast: a CI machine
#: running Prism jobs beside the servers makes a cold Cassandra read take
#: seconds now and then, and a 503 there says nothing about the feature under
#: test. The degradation tests use the production budgets (``PRODUCTION_BUDGETS``).
RELAXED_BUDGETS = dict(redis_timeout_s=1.0, cassandra_timeout_s=3.0, request_budget_s=10.0,
                       rebuild_budget_s=5.0)
PRODUCTION_BUDGETS = {name: getattr(ServingConfig, name) for name in RELAXED_BUDGETS}


def serving_config(stack, key_prefix: str, keyspace: str, **overrides) -> ServingConfig:
    """The API's config on the test stack, with ``RELAXED_BUDGETS`` unless overridden."""
    # The tests write Redis through the stores, without the jobs' generation
    # marker: unchecked unless a test asks (test_redis_loss.py).
    values = dict(jwt_key=JWT_KEY, redis_url=stack.redis_url, key_prefix=key_prefix,
                  cassandra_host=stack.cassandra_host, cassandra_port=stack.cassandra_port,
                  keyspace=keyspace, generation_check_s=0.0, **RELAXED_BUDGETS)
    values.update(overrides)
    return ServingConfig(**values)


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """A throwaway redis-server on a free port (no persistence); killed afterwards."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (Debian package redis-server)"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fb-redis-") as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            client = redis.Redis(port=port, socket_timeout=1)

            def ping():
                try:
                    return client.ping()
                except redis.ConnectionError:
                    return False

            wait_until(ping, 15, "the private redis-server")
            client.close()
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def served(server: str, args: list[str], env: dict | None = None) -> Iterator[int]:
    """``feedbeam serve --server SERVER ARGS`` on a free port (its own process
    group, stopped afterwards); yields the port once ``/healthz`` answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", "--server", server, "--port", str(port),
         "--jwt-key", JWT_KEY, *args], env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"feedbeam serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(healthy, 60, f"feedbeam serve --server {server}", 0.2)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def raw_exchange(port: int, data: bytes, timeout_s: float = 30.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it or
    ``timeout_s`` passes (then ``socket.timeout``): what a misbehaving client sees."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def command_calls(client) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``)."""
    return {name.split("_", 1)[1]: stats["calls"]
            for name, stats in client.info("commandstats").items()}


def follow_raw(client, keys: KeyLayout, user_id: int, followees, since_ms: int) -> None:
    """``user_id`` follows ``followees`` (oldest first), written as the fan-out
    lays the graph out (``following`` / ``followers`` sorted sets), so these tests
    do not depend on the fan-out's code."""
    pipe = client.pipeline(transaction=False)
    for i, f in enumerate(followees):
        pipe.zadd(keys.following(user_id), {str(f): since_ms + i})
        pipe.zadd(keys.followers(f), {str(user_id): since_ms + i})
    pipe.execute()


def story_raw(client, keys: KeyLayout, story_id: int, author_id: int, created_at: int,
              expires_at: int) -> None:
    """A live story as the stories pipeline lays it out (hash + author's index)."""
    client.hset(keys.story(story_id), mapping={"author_id": author_id, "created_at": created_at,
                                               "expires_at": expires_at})
    client.zadd(keys.author_stories(author_id), {str(story_id): expires_at})
