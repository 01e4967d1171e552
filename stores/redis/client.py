"""The Redis client every store uses, and the chunking of its batches.

    client = new_client("redis://127.0.0.1:6379/0")

``new_client`` makes one attempt per command (whoever applies a batch
retries it whole, ``stores.retry``) and re-runs a batch whose scripts a
restarted server lost (``ScriptSafePipeline``): safe because every store
writes idempotently.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    for start in range(0, len(items), size):
        yield items[start:start + size]


class ScriptSafePipeline(redis.client.Pipeline):
    """A pipeline that outlives a Redis restart between loading its scripts and running them.

    redis-py loads a pipeline's scripts (``SCRIPT LOAD``) once, then runs the
    batch, retrying it on a dropped connection; a server restarted (or its
    script cache flushed) in between answers the batch's ``EVALSHA`` with
    ``NoScriptError``, and the bundle writing it failed (on Prism: the job).
    Here the whole batch runs once more, scripts loaded again: the stores
    using it write idempotently, so running commands twice is what a retried
    bundle does anyway.
    """

    def execute(self, raise_on_error: bool = True) -> list:
        stack, scripts = list(self.command_stack), set(self.scripts)
        try:
            return super().execute(raise_on_error)
        except redis.exceptions.NoScriptError:
            if not scripts:
                raise
            log.warning("redis: the server lost its scripts mid-batch (a restart?); "
                        "running the batch of %d commands again", len(stack))
            self.command_stack, self.scripts = stack, scripts  # execute() reset them
            return super().execute(raise_on_error)


class ScriptSafeRedis(redis.Redis):
    """``redis.Redis`` whose pipelines are ``ScriptSafePipeline``s."""

    def pipeline(self, transaction: bool = True, shard_hint=None) -> ScriptSafePipeline:
        return ScriptSafePipeline(self.connection_pool, self.response_callbacks, transaction,
                                  shard_hint)


def new_client(url: str) -> "redis.Redis":
    """A client for ``url`` that does not retry (``stores.retry`` does, per batch) and
    survives lost scripts (``ScriptSafePipeline``)."""
    return ScriptSafeRedis.from_url(
        url,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), retries=0),
    )
