"""Reading fields of many hashes in a few Redis commands, not one command per hash.

    reads = HashReads(client)
    pipe = client.pipeline(transaction=False)
    first = reads.same(pipe, keys, ["like_1h", "view_1h"])      # one call per chunk of keys
    second = reads.each(pipe, keys, [["3", "9"], ["4"]])          # each key its own fields
    replies = pipe.execute()
    reads.replies(first, replies)                                 # [[b"2@...", None], ...]

A refresh batch reads thousands of small hashes (post metadata, post and
author features, affinities). As single commands, the client's per-command
work (packing, reply parsing, callbacks) costs far more than Redis' own; one
script call per chunk of keys returns all of them as one nested reply, parsed
in C. The keys of a call belong to different hash slots: on a Redis Cluster
each call is split by slot (``stores.redis.client.BatchLayout``; one key per
item, the fields a shared header or the item's one argument), as the fan-out's
push script is.
"""
from __future__ import annotations

from typing import Sequence

from stores.redis.client import BatchLayout, register_batch_script

#: Keys per script call: bounds how long one call holds Redis.
DEFAULT_CHUNK = 2000

# KEYS: hashes. ARGV[1]: the fields joined by ','. Per key the HMGET of the fields.
_SAME = """
local fields = {}
for f in string.gmatch(ARGV[1], '[^,]+') do
  fields[#fields + 1] = f
end
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HMGET', KEYS[i], unpack(fields))
end
return out
"""
_SAME_LAYOUT = BatchLayout(header=1, keys_per_item=1)

# KEYS: hashes. ARGV: per key its fields joined by ','. Per key the HMGET of its fields.
_EACH = """
local out = {}
for i = 1, #KEYS do
  local fields = {}
  for f in string.gmatch(ARGV[i], '[^,]+') do
    fields[#fields + 1] = f
  end
  if #fields > 0 then
    out[i] = redis.call('HMGET', KEYS[i], unpack(fields))
  else
    out[i] = {}
  end
end
return out
"""
_EACH_LAYOUT = BatchLayout(header=0, keys_per_item=1, args_per_item=1)


class HashReads:
    """Queues batched HMGETs on a pipeline; ``replies`` picks their results out of
    ``pipe.execute()``'s (each call returns the slice of replies it queued)."""

    def __init__(self, client, chunk: int = DEFAULT_CHUNK):
        self._same = register_batch_script(client, _SAME, _SAME_LAYOUT)
        self._each = register_batch_script(client, _EACH, _EACH_LAYOUT)
        self.chunk = chunk

    def same(self, pipe, keys: Sequence[str], fields: Sequence[str]) -> slice:
        """HMGET ``fields`` (names without commas) of every key; returns where the
        replies will be."""
        start = len(pipe)
        if fields:
            joined = ",".join(fields)
            for i in range(0, len(keys), self.chunk):
                self._same(keys=keys[i:i + self.chunk], args=[joined], client=pipe)
        return slice(start, len(pipe))

    def each(self, pipe, keys: Sequence[str], fields: Sequence[Sequence]) -> slice:
        """HMGET ``fields[i]`` (ids or names without commas) of ``keys[i]``."""
        start = len(pipe)
        for i in range(0, len(keys), self.chunk):
            self._each(keys=keys[i:i + self.chunk],
                       args=[",".join(map(str, f)) for f in fields[i:i + self.chunk]],
                       client=pipe)
        return slice(start, len(pipe))

    @staticmethod
    def replies(where: slice, replies: Sequence) -> list[list]:
        """The per-key replies (lists of values or None) queued at ``where``."""
        return [r for chunk in replies[where] for r in chunk]
