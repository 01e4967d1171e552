"""The serving API as a plain ASGI application (no web framework on the hot path).

    feedbeam serve --port 8080 --jwt-key "$KEY"       # or:
    python -m granian --interface asgi serving.app:create_app --factory

The routes are in ``serving.openapi`` (served at ``/openapi.json``) and
docs/serving.md. Every request runs under ``request_budget_s``; any failure
becomes a JSON error with a 4xx or 503 status, never an unhandled 500.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson

from stores.cassandra.aio import AioCassandra
from stores.redis.aio import RedisUnavailable, connect
from serving.auth import USER_ID_MAX, AuthError, TokenAuth, parse_user_id
from serving.config import ServingConfig
from serving.feeds import FeedResult, FeedService, Overloaded, StoresUnavailable
from serving.logic import Cursor, CursorCodec, CursorError, RankedCursor, TrayCursor
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import Metrics
from serving.openapi import openapi
from serving.stories import StoryNotFound, StoryService

log = logging.getLogger(__name__)

_JSON = b"application/json"


class LoopLag:
    """How late this worker's event loop runs: a task asks to wake every
    ``interval_s`` and records by how much it overslept (the time requests
    wait before the loop gets to them)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval_s)
            self.lag_s = max(0.0, loop.time() - started - self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def __call__(self) -> float:
        return self.lag_s


class FullCollections:
    """This worker's full garbage collections (generation 2) every ``every_s``
    instead of whenever Python's counters say.

    A full collection scans every tracked object the worker holds (its post
    cache, connections, code) with the event loop stopped: measured at 83-125 ms
    on the loaded 2-core machine, every request of that worker waiting through
    it, a few times a minute at 1,000 requests/s (docs/serving.md, "Garbage
    collection"). ``start`` collects once and freezes what the worker holds
    after start-up (never scanned again), turns off Python's own full
    collections (the two younger generations stay as they are: short, and they
    find the cycles requests leave) and runs one full collection each
    ``every_s``, logging how long it took. ``stop`` gives Python its schedule back.
    """

    #: A generation-2 threshold Python's counters never reach.
    NEVER = 1 << 30

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.collections = 0
        self.last_ms: float | None = None
        self._thresholds: tuple[int, int, int] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.every_s <= 0 or self._task is not None:
            return
        gc.collect()
        gc.freeze()
        self._thresholds = gc.get_threshold()
        young, older, _ = self._thresholds
        gc.set_threshold(young, older, self.NEVER)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.collect()

    def collect(self) -> int:
        """One full collection now; returns the unreachable objects it found."""
        started = time.perf_counter()
        found = gc.collect()
        self.last_ms = (time.perf_counter() - started) * 1000
        self.collections += 1
        log.info("full garbage collection: %d unreachable objects, %.1f ms", found, self.last_ms)
        return found

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            gc.unfreeze()
            self._thresholds = None


class HttpError(Exception):
    """An error answer: status and a message for the client."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def _error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"status": status, "message": message}})


def _parse_id(text: str, name: str) -> int:
    value = parse_user_id(text)
    if value is None:
        raise HttpError(400, f"{name} must be an integer between 0 and {USER_ID_MAX}")
    return value


def _body_refusal(headers, max_bytes: int) -> HttpError | None:
    """413 for a request body larger than ``max_bytes`` or of unknown length
    (chunked): no route reads one, so a large body is only ever a cost."""
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or int(value) > max_bytes:
                return HttpError(413, f"request body larger than {max_bytes} bytes")
        elif name == b"transfer-encoding":
            return HttpError(413, "chunked request bodies are not accepted")
    return None


class FeedApp:
    """The ASGI callable (see module doc). ``lifespan`` opens and closes the stores;
    a server without lifespan support gets them opened on the first request."""

    def __init__(self, config: ServingConfig):
        self.config = config
        self.auth = TokenAuth(config.jwt_key)
        self.cursors = CursorCodec(config.jwt_key.encode())
        self.metrics = Metrics()
        self.redis = connect(config.redis_url, timeout_s=config.redis_timeout_s)
        self.cassandra = AioCassandra(config.cassandra_host, config.cassandra_port,
                                      config.keyspace, timeout_s=config.cassandra_timeout_s)
        self.lag = LoopLag()
        self.collections = FullCollections(config.full_gc_every_s)
        self.feeds = FeedService(config, self.redis, self.cassandra, self.metrics, self.lag)
        self.stories: StoryService | None = None
        self._openapi = orjson.dumps(openapi(config.default_limit, config.max_limit))
        self._started = False
        self._in_flight = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def startup(self, wait_for_cassandra_s: float = 5.0) -> None:
        if self._started:
            return
        self._started = True
        self.stories = StoryService(self.feeds)
        self.lag.start()
        self.collections.start()
        await self.cassandra.start()
        # Give Cassandra a moment so the first requests can use it; never block on it.
        await self.cassandra.wait_connected(wait_for_cassandra_s)

    async def shutdown(self) -> None:
        self.lag.stop()
        self.collections.stop()
        await self.feeds.flush_reads()
        await self.redis.close()
        await self.cassandra.close()
        self._started = False

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        if not self._started:
            await self.startup(wait_for_cassandra_s=0.0)
        started = time.perf_counter()
        route = "unknown"
        content_type = _JSON
        extra: list[tuple[bytes, bytes]] = []
        self._in_flight += 1
        try:
            if self._in_flight > self.config.max_in_flight:
                self.metrics.event("shed")
                raise HttpError(503, f"overloaded: {self.config.max_in_flight} requests in "
                                     "progress, retry shortly", [(b"retry-after", b"1")])
            refusal = _body_refusal(scope["headers"], self.config.max_body_bytes)
            if refusal is not None:
                raise refusal
            async with asyncio.timeout(self.config.request_budget_s):
                route, status, body, content_type = await self._dispatch(scope)
        except HttpError as exc:
            status, body, extra = exc.status, _error_body(exc.status, exc.message), exc.headers
        except TimeoutError:
            status, body = 503, _error_body(503, "the request did not finish within "
                                                 f"{self.config.request_budget_s * 1000:.0f} ms")
        except Overloaded as exc:
            status, body, extra = 503, _error_body(503, str(exc)), [(b"retry-after", b"1")]
        except StoresUnavailable as exc:
            status, body = 503, _error_body(503, f"feed stores unavailable: {exc}")
        except Exception:  # a bug: log it, still answer with JSON, never crash the worker
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            status, body = 500, _error_body(500, "internal error")
        finally:
            self._in_flight -= 1
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.request(route, status, time.perf_counter() - started)

    async def _dispatch(self, scope) -> tuple[str, int, bytes, bytes]:
        method, path = scope["method"], scope["path"]
        parts = path.strip("/").split("/")
        if parts[0] == "v1" and len(parts) >= 4 and parts[1] == "users":
            return await self._user_route(scope, method, parts)
        if len(parts) == 1 and parts[0] in ("healthz", "readyz", "metrics", "openapi.json"):
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"{method} not allowed on {path}", [(b"allow", b"GET")])
            return await self._plain_route(parts[0])
        raise HttpError(404, f"no route {method} {path}")

    async def _plain_route(self, name: str) -> tuple[str, int, bytes, bytes]:
        if name == "healthz":
            return name, 200, b'{"status":"ok"}', _JSON
        if name == "openapi.json":
            return name, 200, self._openapi, _JSON
        if name == "metrics":
            body = self.metrics.render(self.feeds.status())
            return name, 200, body, METRICS_CONTENT_TYPE.encode()
        return name, *await self._readiness(), _JSON

    async def _readiness(self) -> tuple[int, bytes]:
        """``{"status", "redis", "cassandra"}``, each store ``ready`` or ``not ready``;
        why one is not goes to the log, not to whoever asks."""
        breakers = self.feeds.status()
        try:
            await self.redis.call("PING")
            redis_ok = True
        except (RedisUnavailable, Exception) as exc:  # any error reply means "not ready"
            redis_ok = False
            self.feeds.log_failure("redis", exc)
        cassandra_ok = self.cassandra.connected and breakers["cassandra"] != "open"
        if not self.cassandra.connected and self.cassandra.last_error:
            self.feeds.log_failure("cassandra", RuntimeError(self.cassandra.last_error))
        oks = (redis_ok, cassandra_ok)
        body = {"status": "ready" if all(oks) else "degraded" if any(oks) else "unavailable",
                "redis": "ready" if redis_ok else "not ready",
                "cassandra": "ready" if cassandra_ok else "not ready"}
        return (200 if any(oks) else 503), orjson.dumps(body)

    async def _user_route(self, scope, method: str, parts: list[str]) -> tuple[str, int, bytes, bytes]:
        tail = tuple(parts[3:])
        if tail == ("feed",):
            route, allowed = "feed", "GET"
        elif tail == ("feed", "chronological"):
            route, allowed = "feed_chronological", "GET"
        elif tail == ("stories", "tray"):
            route, allowed = "story_tray", "GET"
        elif len(tail) == 3 and tail[0] == "stories" and tail[2] == "seen":
            route, allowed = "story_seen", "POST"
        else:
            raise HttpError(404, f"no route {method} {scope['path']}")
        if method != allowed:
            raise HttpError(405, f"{method} not allowed here, use {allowed}",
                            [(b"allow", allowed.encode())])
        user_id = self._authorize(scope, parts[2])
        query = self._query(scope)
        if route == "story_seen":
            story_id = _parse_id(tail[1], "story_id")
            try:
                source = await self.stories.mark_seen(user_id, story_id)
            except StoryNotFound as exc:
                raise HttpError(404, str(exc)) from None
            return route, 200, orjson.dumps({"seen": True, "source": source}), _JSON
        limit = self._limit(query)
        cursor = self._cursor(query, user_id)
        if route == "story_tray":
            if cursor is not None and not isinstance(cursor, TrayCursor):
                raise HttpError(400, "bad cursor: it belongs to a feed, not the tray")
            entries, source, nxt = await self.stories.tray(user_id, limit, cursor)
            return route, 200, orjson.dumps(
                {"user_id": user_id, "source": source, "entries": entries,
                 "next_cursor": None if nxt is None else self.cursors.encode(nxt)}), _JSON
        if isinstance(cursor, TrayCursor):
            raise HttpError(400, "bad cursor: it belongs to the story tray")
        if route == "feed_chronological":
            if isinstance(cursor, RankedCursor):
                raise HttpError(400, "bad cursor: it belongs to the ranked feed")
            result = await self.feeds.chronological(user_id, limit, cursor)
        else:
            result = await self.feeds.feed(user_id, limit, cursor)
        return route, 200, self._feed_body(user_id, result), _JSON

    # -- request pieces --------------------------------------------------------------

    def _authorize(self, scope, path_user: str) -> int:
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            caller = self.auth.user_id(header)
        except AuthError as exc:
            raise HttpError(401, str(exc), [(b"www-authenticate", b'Bearer realm="feedbeam"')]) from None
        user_id = _parse_id(path_user, "user_id")
        if user_id != caller:
            raise HttpError(403, "a user can only read their own feed and tray")
        return user_id

    @staticmethod
    def _query(scope) -> dict[str, str]:
        raw = scope.get("query_string", b"")
        if not raw:
            return {}
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False, max_num_fields=20))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"bad query string: {exc}") from None

    def _limit(self, query: dict[str, str]) -> int:
        raw = query.get("limit")
        if raw is None:
            return self.config.default_limit
        lo, hi = 1, self.config.max_limit
        if not raw.isdigit() or not raw.isascii() or len(raw) > 6 or not lo <= int(raw) <= hi:
            raise HttpError(400, f"limit must be an integer between {lo} and {hi}")
        return int(raw)

    def _cursor(self, query: dict[str, str], user_id: int) -> Cursor | None:
        raw = query.get("cursor")
        if raw is None:
            return None
        try:
            cursor = self.cursors.decode(raw)
        except CursorError as exc:
            raise HttpError(400, str(exc)) from None
        if cursor.user_id != user_id:
            raise HttpError(400, "bad cursor: it belongs to another user")
        return cursor

    def _feed_body(self, user_id: int, result: FeedResult) -> bytes:
        body: dict[str, Any] = {
            "user_id": user_id, "kind": result.kind, "source": result.source,
            "model_version": result.model_version, "items": result.items,
            "next_cursor": None if result.next_cursor is None else self.cursors.encode(result.next_cursor),
        }
        return orjson.dumps(body)


def create_app(config: ServingConfig | None = None) -> FeedApp:
    """The app; without ``config``, one from ``FEEDBEAM_SERVE_*`` settings that
    ``feedbeam serve`` passes to its worker processes (``config_from_environment``)."""
    if config is None:
        from serving.config import config_from_environment

        config = config_from_environment()
    return FeedApp(config)
