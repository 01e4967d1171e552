"""The ranking pipeline's durable pending-refresh queue in Redis, and its viral marks.

    queue = RefreshQueue(client, KeyLayout("fb"), shards=4, debounce=Debounce())
    queue.add([Trigger(7, now_ms, "engaged")], now_ms)      # {shard: earliest due}
    claim = queue.claim(shard, now_ms, limit=256)           # users due, with their triggers
    queue.finish(shard, done=[(7, seq)], deferred=[], now_ms=now_ms)

Users are spread over ``shards`` by id; each shard is a handful of keys under
one hash tag (``{rq:<shard>}``), so every script touches one slot. A user's
triggers wait here, not in runner state: a job killed at any point loses
nothing, and a restart drains what is due. Claims are leases: a claim not
finished within ``lease_ms`` (its worker died) is handed out again. The
debounce rules are ``domain.ranking.Debounce``'s; how it fits together:
docs/pipelines/ranking.md, "Pending refreshes".
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from domain.ranking import Debounce
from schemas.keys import KeyLayout
from schemas.ranking import ClaimedRefreshes, Trigger, encode_triggers

#: A user's queued trigger text beyond this many bytes is not appended to (the
#: user stays due; counted as ``payload_full``). Bounded by the follow gate's
#: wait in practice: triggers are dropped as their refresh finishes.
DEFAULT_MAX_PAYLOAD = 256 * 1024
#: Users per ``add`` script call.
_ADD_CHUNK = 500

# Every script takes one shard's KEYS: due (ZSET user -> due ms), triggers (HASH
# user -> text), bucket (ZSET user -> full_at ms), inflight (ZSET user -> lease
# end ms), waits (HASH user -> follow-gate wait), stats (HASH counters and seq).

# ARGV: now, settle, slack, max payload, then (user, trigger lines) pairs.
# Appends each user's lines under a new '#<seq>' head; a user not yet due is due
# at max(now + settle, full_at - slack). Returns the shard's earliest due.
_ADD = """
local now, settle, slack = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local head = '#' .. redis.call('HINCRBY', KEYS[6], 'seq', 1) .. '\\n'
local full_payloads = 0
for i = 5, #ARGV, 2 do
  local u = ARGV[i]
  local held = redis.call('HGET', KEYS[2], u) or ''
  if #held + #ARGV[i + 1] <= cap then
    redis.call('HSET', KEYS[2], u, held .. head .. ARGV[i + 1])
  else
    full_payloads = full_payloads + 1
  end
  if not redis.call('ZSCORE', KEYS[1], u) then
    local due = now + settle
    local full = redis.call('ZSCORE', KEYS[3], u)
    if full and tonumber(full) - slack > due then
      due = tonumber(full) - slack
    end
    redis.call('ZADD', KEYS[1], due, u)
  end
end
if full_payloads > 0 then
  redis.call('HINCRBY', KEYS[6], 'payload_full', full_payloads)
end
return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
"""

# ARGV: now, lease ms, max users. Expired leases go back to due first; then up to
# max due users are leased (a due user still leased elsewhere is put off to that
# lease's end). Returns {flat (user, triggers, wait) list, earliest due or false,
# earliest lease end or false}.
_CLAIM = """
local now, lease, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lost = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, u in ipairs(lost) do
  redis.call('ZREM', KEYS[4], u)
  local d = redis.call('ZSCORE', KEYS[1], u)
  if not d or tonumber(d) > now then
    redis.call('ZADD', KEYS[1], now, u)
  end
end
if #lost > 0 then
  redis.call('HINCRBY', KEYS[6], 'leases_expired', #lost)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local out = {}
for _, u in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, max)) do
  local held = redis.call('ZSCORE', KEYS[4], u)
  if held then
    redis.call('ZADD', KEYS[1], held, u)
  else
    redis.call('ZREM', KEYS[1], u)
    redis.call('ZADD', KEYS[4], now + lease, u)
    out[#out + 1] = u
    out[#out + 1] = redis.call('HGET', KEYS[2], u) or ''
    out[#out + 1] = redis.call('HGET', KEYS[5], u) or ''
  end
end
return {out, redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or false,
        redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2] or false}
"""

# ARGV: now, settle, interval, slack, number of done users, then (user, seq) pairs of
# refreshed users, then (user, retry at, wait) triples of deferred ones.
# A refreshed user: its trigger lines up to seq dropped, lease and wait cleared, a
# token taken from its bucket; if triggers came meanwhile it is due again at
# max(now + settle, full_at - slack). A deferred user: lease cleared, wait kept,
# due at retry at (or sooner if already due sooner), its triggers kept.
# Returns the shard's earliest due.
_FINISH = """
local now, settle = tonumber(ARGV[1]), tonumber(ARGV[2])
local interval, slack = tonumber(ARGV[3]), tonumber(ARGV[4])
local done_end = 5 + 2 * tonumber(ARGV[5])
for i = 6, done_end, 2 do
  local u, seq = ARGV[i], tonumber(ARGV[i + 1])
  local held = redis.call('HGET', KEYS[2], u)
  if held then
    local rest = nil
    for at, s in string.gmatch(held, '()#(%d+)\\n') do
      if tonumber(s) > seq then
        rest = string.sub(held, at)
        break
      end
    end
    if rest then
      redis.call('HSET', KEYS[2], u, rest)
    else
      redis.call('HDEL', KEYS[2], u)
    end
  end
  redis.call('ZREM', KEYS[4], u)
  redis.call('HDEL', KEYS[5], u)
  local full = math.max(tonumber(redis.call('ZSCORE', KEYS[3], u) or now), now) + interval
  redis.call('ZADD', KEYS[3], full, u)
  if redis.call('ZSCORE', KEYS[1], u) then
    redis.call('ZADD', KEYS[1], math.max(now + settle, full - slack), u)
  end
end
for i = done_end + 1, #ARGV, 3 do
  local u, at = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZREM', KEYS[4], u)
  redis.call('HSET', KEYS[5], u, ARGV[i + 2])
  local d = redis.call('ZSCORE', KEYS[1], u)
  if not d or tonumber(d) > at then
    redis.call('ZADD', KEYS[1], at, u)
  end
end
redis.call('HINCRBY', KEYS[6], 'refreshed', tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[6], 'deferred', (#ARGV - done_end) / 3)
return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
"""

# KEYS[1] a post's viral level. ARGV: level, ttl ms. 1 if the level was raised to
# ARGV[1] (it was lower), else 0: each level of a post triggers once.
_RAISE_LEVEL = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Claim(NamedTuple):
    """What ``claim`` handed out (``refreshes``) and when the shard next needs a
    claim (``next_at_ms``: its earliest due or lease end; None when empty);
    ``leased``: some user of the shard is out on a claim (this one or an earlier)."""

    refreshes: ClaimedRefreshes
    next_at_ms: int | None
    leased: bool = False


def _ms(value) -> int | None:
    return None if value is None or value is False else int(float(value))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RefreshQueue:
    """Pending ranked-feed refreshes in Redis (see the module doc). One attempt per call
    (the caller retries a batch); every call is one round trip."""

    def __init__(self, client, keys: KeyLayout, shards: int = 4,
                 debounce: Debounce = Debounce(), lease_ms: int = 30_000,
                 max_payload: int = DEFAULT_MAX_PAYLOAD):
        if shards < 1 or lease_ms < 1:
            raise ValueError("shards and lease_ms must be >= 1")
        self.client = client
        self.keys = keys
        self.shards = shards
        self.debounce = debounce
        self.lease_ms = lease_ms
        self.max_payload = max_payload
        self._add = client.register_script(_ADD)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._raise_level = client.register_script(_RAISE_LEVEL)

    # -- key layout --------------------------------------------------------------------

    def shard_of(self, user_id: int) -> int:
        return user_id % self.shards

    def shard_keys(self, shard: int) -> list[str]:
        """The shard's keys, one hash tag: due, triggers, bucket, inflight, waits, stats."""
        p, tag = self.keys.prefix, f"{{rq:{shard}}}"
        return [f"{p}:rq_due:{tag}", f"{p}:rq_triggers:{tag}", f"{p}:rq_bucket:{tag}",
                f"{p}:rq_inflight:{tag}", f"{p}:rq_waits:{tag}", f"{p}:rq_stats:{tag}"]

    def viral_level_key(self, post_id: int) -> str:
        """STRING: the highest engagement level of the post that re-ranked its audience."""
        return f"{self.keys.prefix}:viral_level:{{p:{post_id}}}"

    def viral_user_key(self, user_id: int) -> str:
        """STRING with a TTL: the user was re-ranked for a viral post lately."""
        return f"{self.keys.prefix}:viral_user:{{u:{user_id}}}"

    # -- the queue ---------------------------------------------------------------------

    def add(self, triggers: Sequence[Trigger], now_ms: int) -> dict[int, int]:
        """Queue ``triggers`` (any users); returns ``{shard: earliest due ms}`` of the
        shards written."""
        by_shard: dict[int, dict[int, list[Trigger]]] = {}
        for t in triggers:
            by_shard.setdefault(self.shard_of(t.user_id), {}).setdefault(t.user_id, []).append(t)
        if not by_shard:
            return {}
        d = self.debounce
        pipe = self.client.pipeline(transaction=False)
        calls = []
        for shard in sorted(by_shard):
            users = list(by_shard[shard].items())
            for i in range(0, len(users), _ADD_CHUNK):  # bounds how long a call holds Redis
                args: list = [now_ms, d.settle_ms, d.slack_ms, self.max_payload]
                for user, ts in users[i:i + _ADD_CHUNK]:
                    args += [user, encode_triggers(ts)]
                self._add(keys=self.shard_keys(shard), args=args, client=pipe)
                calls.append(shard)
        due: dict[int, int] = {}
        for shard, first in zip(calls, pipe.execute()):
            due[shard] = _ms(first)  # the last call of a shard saw all of its adds
        return due

    def claim(self, shard: int, now_ms: int, limit: int) -> Claim:
        """Lease up to ``limit`` users of ``shard`` whose refresh is due at ``now_ms``."""
        flat, next_due, next_lease = self._claim(keys=self.shard_keys(shard),
                                                 args=[now_ms, self.lease_ms, limit])
        users = [int(u) for u in flat[0::3]]
        refreshes = ClaimedRefreshes(shard, now_ms, users, [_text(p) for p in flat[1::3]],
                                     [_text(w) for w in flat[2::3]])
        nexts = [t for t in (_ms(next_due), _ms(next_lease)) if t is not None]
        return Claim(refreshes, min(nexts) if nexts else None, _ms(next_lease) is not None)

    def finish(self, shard: int, done: Sequence[tuple[int, int]],
               deferred: Sequence[tuple[int, int, str]], now_ms: int) -> int | None:
        """Release claims of ``shard``: ``done`` ``(user, seq)`` were refreshed with the
        triggers up to ``seq``; ``deferred`` ``(user, retry at ms, wait)`` are put off
        with their triggers kept. Returns the shard's earliest due."""
        d = self.debounce
        args: list = [now_ms, d.settle_ms, d.interval_ms, d.slack_ms, len(done)]
        for user, seq in done:
            args += [user, seq]
        for user, at, wait in deferred:
            args += [user, at, wait]
        return _ms(self._finish(keys=self.shard_keys(shard), args=args))

    # -- viral marks -----------------------------------------------------------------

    def raise_levels(self, levels: Sequence[tuple[int, int]], ttl_ms: int) -> list[int]:
        """The posts of ``(post_id, level)`` whose stored level was lower (now raised)."""
        if not levels:
            return []
        pipe = self.client.pipeline(transaction=False)
        for post_id, level in levels:
            self._raise_level(keys=[self.viral_level_key(post_id)], args=[level, ttl_ms],
                              client=pipe)
        return [p for (p, _), raised in zip(levels, pipe.execute()) if raised == 1]

    def admit_viral(self, user_ids: Sequence[int], interval_ms: int) -> list[int]:
        """The users not re-ranked for a viral post within ``interval_ms`` (now marked)."""
        if not user_ids or interval_ms <= 0:
            return list(user_ids)
        pipe = self.client.pipeline(transaction=False)
        for u in user_ids:
            pipe.set(self.viral_user_key(u), 1, nx=True, px=interval_ms)
        return [u for u, ok in zip(user_ids, pipe.execute()) if ok]

    # -- inspection (tests, status, benchmarks) ------------------------------------------

    def waiting(self) -> int:
        """How many users are due or claimed, over all shards (0: the queue is worked off)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            due, _, _, inflight, _, _ = self.shard_keys(shard)
            pipe.zcard(due)
            pipe.zcard(inflight)
        return sum(pipe.execute())

    def pending(self) -> dict[int, dict]:
        """``{user: {"due": ms or None, "lease": ms or None, "triggers": text, "wait":
        text}}`` of every user the queue holds."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            due, trig, _, inflight, waits, _ = self.shard_keys(shard)
            pipe.zrange(due, 0, -1, withscores=True)
            pipe.zrange(inflight, 0, -1, withscores=True)
            pipe.hgetall(trig)
            pipe.hgetall(waits)
        replies = pipe.execute()
        out: dict[int, dict] = {}

        def entry(u) -> dict:
            return out.setdefault(int(u), {"due": None, "lease": None, "triggers": "",
                                           "wait": ""})

        for i in range(0, len(replies), 4):
            due, inflight, trig, waits = replies[i:i + 4]
            for u, score in due:
                entry(u)["due"] = int(score)
            for u, score in inflight:
                entry(u)["lease"] = int(score)
            for u, text in trig.items():
                entry(u)["triggers"] = _text(text)
            for u, text in waits.items():
                entry(u)["wait"] = _text(text)
        return out

    def stats(self) -> dict[str, int]:
        """Counters summed over the shards: ``refreshed``, ``deferred``,
        ``leases_expired``, ``payload_full`` (and ``seq``, the adds)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.hgetall(self.shard_keys(shard)[5])
        total: dict[str, int] = {}
        for counters in pipe.execute():
            for name, value in counters.items():
                total[_text(name)] = total.get(_text(name), 0) + int(value)
        return total
