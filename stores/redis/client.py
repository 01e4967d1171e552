"""The Redis client every store uses, and the chunking of its batches.

    client = new_client("redis://127.0.0.1:6379/0")           # one server
    client = new_client("redis+cluster://127.0.0.1:7001/0")   # a Redis Cluster, by any node

``new_client`` makes one attempt per command (whoever applies a batch
retries it whole, ``stores.retry``) and re-runs a batch whose scripts a
restarted server lost (``ScriptSafePipeline``): safe because every store
writes idempotently.

On a Redis Cluster (``ScriptSafeRedisCluster``) every key of a user, post or
story shares its hash slot (``schemas.keys``), so one-entity commands and
scripts route as they are. The batch scripts that touch many users in one
call, and MGETs over many users, are split by slot inside the pipeline
(``SlotSplitPipeline``): a store registers such a script with
``register_batch_script`` and its ``BatchLayout``, and gets the same reply as
from one server.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterPipeline, RedisCluster
from redis.crc import key_slot
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


#: The URL scheme that names a Redis Cluster (by one of its nodes) instead of one server.
CLUSTER_SCHEME = "redis+cluster"


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme == CLUSTER_SCHEME


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a batch script's KEYS and ARGV divide into items, so a call can be split by
    hash slot and its replies put back together.

    ARGV starts with ``header`` values every item shares; then each item has
    ``keys_per_item`` consecutive keys (one entity's: one slot) and either
    ``args_per_item`` values or, when ``counted`` = (m1, m2, ...), counts n1,
    n2, ... followed by m1 * n1 + m2 * n2 + ... values. ``reply`` is ``items``
    (a list with one entry per item, in item order) or ``sum`` (a number, e.g.
    keys written).
    """

    header: int
    keys_per_item: int
    args_per_item: int = 0
    counted: tuple[int, ...] = ()
    reply: str = "items"

    def split(self, keys: Sequence[Any], args: Sequence[Any]
              ) -> tuple[list[tuple[list, list]], Callable[[list], Any]]:
        """The ``(keys, args)`` of one call per slot, and the function that turns their
        replies (in that order) into the reply of the whole call."""
        head, rest = list(args[:self.header]), args[self.header:]
        k, j = self.keys_per_item, 0
        by_slot: dict[int, tuple[list, list, list]] = {}
        for i in range(len(keys) // k):
            item_keys = keys[i * k:(i + 1) * k]
            if self.counted:
                n = len(self.counted)
                width = n + sum(m * int(c) for m, c in zip(self.counted, rest[j:j + n]))
            else:
                width = self.args_per_item
            slots = {key_slot(_encode(key)) for key in item_keys}
            if len(slots) != 1:
                raise ValueError(f"the keys of one item span hash slots: {item_keys}")
            indices, call_keys, call_args = by_slot.setdefault(slots.pop(), ([], [], list(head)))
            indices.append(i)
            call_keys += item_keys
            call_args += rest[j:j + width]
            j += width
        calls = [(call_keys, call_args) for _, call_keys, call_args in by_slot.values()]
        order = [indices for indices, _, _ in by_slot.values()]
        if self.reply == "sum":
            return calls, sum

        def merge(replies: list) -> list:
            out: list[Any] = [None] * (len(keys) // k)
            for indices, reply in zip(order, replies):
                for i, value in zip(indices, reply):
                    out[i] = value
            return out
        return calls, merge


def _encode(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def register_batch_script(client, text: str, layout: BatchLayout):
    """``client.register_script(text)`` for a script whose call may span many hash
    slots; on a Redis Cluster its calls are split by ``layout``."""
    script = client.register_script(text)
    if isinstance(client, ScriptSafeRedisCluster):
        client.layouts[script.sha] = layout
    return script


class SlotSplitPipeline(ClusterPipeline):
    """A cluster pipeline (never a transaction) that splits what spans hash slots:
    a batch script's call (by its ``BatchLayout``) and an MGET, each into one
    command per slot, merged back into the one reply the caller queued for.
    Scripts are loaded on every master before the first batch, and again when a
    node answers NOSCRIPT (restarted, or a replica promoted): then the batch runs
    once more, as ``ScriptSafePipeline`` does."""

    def __init__(self, owner: "ScriptSafeRedisCluster", **options):
        super().__init__(**options)
        self._owner = owner
        self._merges: list[tuple[int, int, Callable[[list], Any]]] = []

    def __len__(self) -> int:
        """The replies ``execute()`` will return (a split call counts once), so a caller
        can note where its replies will be, as on one server."""
        return super().__len__() - sum(count - 1 for _, count, _ in self._merges)

    def _queue_split(self, commands: list[tuple], merge: Callable[[list], Any]):
        start = super().__len__()
        for command in commands:
            self.execute_command(*command)
        self._merges.append((start, len(commands), merge))
        return self

    def mget(self, keys, *args):
        keys = [*([keys] if isinstance(keys, (str, bytes)) else keys), *args]
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(_encode(key)), []).append(i)
        if len(by_slot) <= 1:
            return self.execute_command("MGET", *keys)
        groups = list(by_slot.values())

        def merge(replies: list) -> list:
            out: list[Any] = [None] * len(keys)
            for indices, values in zip(groups, replies):
                for i, value in zip(indices, values):
                    out[i] = value
            return out
        return self._queue_split([("MGET", *[keys[i] for i in g]) for g in groups], merge)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args):
        keys, args = keys_and_args[:numkeys], keys_and_args[numkeys:]
        layout = self._owner.layouts.get(sha)
        if layout is None or len({key_slot(_encode(k)) for k in keys}) <= 1:
            return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
        calls, merge = layout.split(keys, args)
        return self._queue_split([("EVALSHA", sha, len(k), *k, *a) for k, a in calls], merge)

    def execute(self, raise_on_error: bool = True) -> list:
        queued = [(c.args, c.options) for c in self._execution_strategy.command_queue]
        merges, self._merges = self._merges, []
        self._owner.load_scripts()
        try:
            replies = super().execute(raise_on_error)
        except redis.exceptions.NoScriptError:
            log.warning("redis cluster: a node lost its scripts (a restart?); loading them "
                        "and running the batch of %d commands again", len(queued))
            self._owner.load_scripts(force=True)
            for command, options in queued:
                self.pipeline_execute_command(*command, **options)
            replies = super().execute(raise_on_error)
        for start, count, merge in reversed(merges):
            replies[start:start + count] = [merge(replies[start:start + count])]
        return replies


class ScriptSafeRedisCluster(RedisCluster):
    """``RedisCluster`` whose pipelines are ``SlotSplitPipeline``s and whose scripts
    are loaded on every master; a script call that spans slots runs through one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts: dict[str, BatchLayout] = {}
        self._scripts: dict[str, str] = {}
        self._loaded: set[str] = set()

    def register_script(self, script):
        registered = super().register_script(script)
        self._scripts[registered.sha] = script
        return registered

    def load_scripts(self, force: bool = False) -> None:
        """SCRIPT LOAD every registered script on every master (once, unless ``force``)."""
        for sha, text in self._scripts.items():
            if force or sha not in self._loaded:
                self.script_load(text)
                self._loaded.add(sha)

    def pipeline(self, transaction=None, shard_hint=None) -> SlotSplitPipeline:
        if transaction or shard_hint:
            raise redis.exceptions.RedisClusterException(
                "feedbeam's cluster pipelines are never transactions")
        return SlotSplitPipeline(
            self, nodes_manager=self.nodes_manager, commands_parser=self.commands_parser,
            startup_nodes=self.nodes_manager.startup_nodes,
            result_callbacks=self.result_callbacks,
            cluster_response_callbacks=self.cluster_response_callbacks,
            read_from_replicas=self.read_from_replicas,
            load_balancing_strategy=self.load_balancing_strategy,
            reinitialize_steps=self.reinitialize_steps, retry=self.retry, lock=self._lock,
            event_dispatcher=self._event_dispatcher)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args):
        pipe = self.pipeline()
        pipe.evalsha(sha, numkeys, *keys_and_args)
        return pipe.execute()[0]

    def mget(self, keys, *args):
        pipe = self.pipeline()
        pipe.mget(keys, *args)
        return pipe.execute()[0]


class PlainArgsPacker:
    """redis-py's hiredis command packer without its pass over every argument.

    redis-py copies each argument of a command to turn a ``bytearray`` or
    ``memoryview`` into ``bytes``, which feedbeam never sends; the fan-out's
    scripts take about 20 arguments per follow event, and leaving that pass out
    took the Python CPU of a follow in process from 26 to 22.5 µs (200,000
    follows in batches of 50,000, ``time.process_time``). hiredis
    packs ``str``, ``bytes``, ``int`` and ``float`` itself; any other argument
    goes through redis-py's packer as before."""

    _fallback = redis.connection.HiredisRespSerializer()

    def pack(self, *args) -> list[bytes]:
        head = args[0]
        if isinstance(head, str):
            args = (*head.encode().split(), *args[1:])
        elif b" " in head:
            args = (*head.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return self._fallback.pack(*args)


def new_client(url: str) -> "redis.Redis | ScriptSafeRedisCluster":
    """A client for ``url`` that does not retry (``stores.retry`` does, per batch) and
    survives lost scripts (``ScriptSafePipeline``); ``redis+cluster://host:port`` gives
    a ``ScriptSafeRedisCluster`` that discovers the other nodes from that one."""
    if is_cluster_url(url):
        u = urlparse(url)
        if u.path.strip("/") not in ("", "0"):
            raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
        return ScriptSafeRedisCluster(
            host=u.hostname or "127.0.0.1", port=u.port or 7001,
            socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30,
            # Redirections (MOVED/ASK after a failover or resharding) are followed;
            # a node that does not answer fails the batch, which stores.retry retries.
            retry=Retry(NoBackoff(), retries=0))
    return ScriptSafeRedis.from_url(
        url,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), retries=0),
        command_packer=PlainArgsPacker(),
    )
