"""An entity's features as one binary string of fixed slots: the layout, its merge, its reads.

A ranking batch reads the features of every candidate post and author it has
not cached: after each expiry of its cache, about 6,000 posts of 12 features
and 2,000 authors. As hashes of ``"<value>@<stamp>"`` fields that was an HMGET
of each (Redis looking up every field) and a text parse of 100,000 values: 30
ms against a scoring of 10 ms for the batch. As one string per entity with a
slot per feature name, it is one MGET for the batch and one ``np.frombuffer``.

A layout is a tuple of feature names (``schemas.features.POST_FEATURES``...):
slot ``i`` holds ``names[i]`` as ``SLOT`` (16 bytes: value as a little-endian
double, write stamp in microseconds as a little-endian int64), ``EMPTY`` where
the entity has no value of that name. ``schemas.keys.KeyLayout`` names the keys
of a layout with a tag of its names (``schemas.keys.layout_tag``), so a change to the names
moves to new keys rather than misreading old ones.

    blob = pack(("like_1h", "view_1h"), {"view_1h": (4.0, 1_700_000_000_000_000)})
    values, stamps_us = unpack([blob, None], 2)           # shape (2, 2); EMPTY_STAMP: none
"""
from __future__ import annotations

import struct
from typing import Mapping, Sequence

import numpy as np

from stores.redis.affinities import ABSENT_STAMP

SLOT = np.dtype([("value", "<f8"), ("stamp", "<i8")])
#: The stamp of an empty slot: older than any TTL reaches, the same "never" as an
#: author a viewer has no affinity record of.
EMPTY_STAMP = ABSENT_STAMP
_SLOT = struct.Struct("<dq")
EMPTY = _SLOT.pack(0.0, EMPTY_STAMP)

# KEYS[1] an entity's slot string. ARGV[1] key TTL in ms, ARGV[2] the layout's slot
# count, then (slot index, 16-byte SLOT) pairs. A slot takes the new value only
# when its stamp is later than the stored one (or equal with a greater value), as
# the hashes' newer-wins; the string is rewritten once. Returns how many were written.
MERGE = """
local n = tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
if not stored then
  stored = string.rep(struct.pack('<d<i8', 0, EMPTY_STAMP), n)
elseif #stored ~= n * 16 then
  return redis.error_reply('feedbeam: feature string of ' .. #stored .. ' bytes, not ' .. n .. ' slots of 16')
end
local new, applied = {}, 0
for i = 3, #ARGV, 2 do
  local at = tonumber(ARGV[i]) + 1
  local held = new[at] or string.sub(stored, at * 16 - 15, at * 16)
  local value, stamp = struct.unpack('<d<i8', held)
  local new_value, new_stamp = struct.unpack('<d<i8', ARGV[i + 1])
  if new_stamp > stamp or (new_stamp == stamp and new_value > value) then
    if not new[at] then applied = applied + 1 end
    new[at] = ARGV[i + 1]
  end
end
if applied == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 0
end
local parts = {}
for at = 1, n do parts[at] = new[at] or string.sub(stored, at * 16 - 15, at * 16) end
redis.call('SET', KEYS[1], table.concat(parts), 'PX', ARGV[1])
return applied
""".replace("EMPTY_STAMP", str(EMPTY_STAMP))


def merge_args(names: Sequence[str], ttl_ms: int,
               values: Mapping[str, tuple[float, int]]) -> list:
    """``MERGE``'s ARGV for ``values`` ``{name: (value, stamp_us)}`` of layout ``names``
    (a name outside it is a ValueError)."""
    at = _slots_of(names)
    args: list = [ttl_ms, len(names)]
    for name, (value, stamp) in values.items():
        slot = at.get(name)
        if slot is None:
            raise ValueError(f"feature {name!r} is not one of {', '.join(names)}")
        args += (slot, _SLOT.pack(float(value), int(stamp)))
    return args


_SLOTS: dict[tuple, dict[str, int]] = {}


def _slots_of(names: Sequence[str]) -> dict[str, int]:
    key = tuple(names)
    at = _SLOTS.get(key)
    if at is None:
        at = _SLOTS[key] = {name: i for i, name in enumerate(key)}
    return at


def pack(names: Sequence[str], values: Mapping[str, tuple[float, int]]) -> bytes:
    """A whole string of layout ``names`` holding ``values`` ``{name: (value, stamp_us)}``
    (for tests and tools; writers merge)."""
    at = _slots_of(names)
    slots = [EMPTY] * len(names)
    for name, (value, stamp) in values.items():
        slots[at[name]] = _SLOT.pack(float(value), int(stamp))
    return b"".join(slots)


def unpack(blobs: Sequence[bytes | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values, stamps_us)``, each ``(len(blobs), width)``, of strings of a layout of
    ``width`` names; None (no key) reads as all slots empty. A string of another size
    is a ValueError (a torn write, or a key of another layout)."""
    size = width * SLOT.itemsize
    empty = EMPTY * width
    joined = []
    for blob in blobs:
        if blob is None:
            joined.append(empty)
        elif len(blob) != size:
            raise ValueError(f"stored features of {len(blob)} bytes, not {width} slots of "
                             f"{SLOT.itemsize}")
        else:
            joined.append(blob)
    slots = np.frombuffer(b"".join(joined), SLOT).reshape(len(blobs), width)
    return slots["value"].astype(np.float64), slots["stamp"].astype(np.int64)


def fields(names: Sequence[str], blob: bytes | None) -> dict[str, tuple[float, int]]:
    """``{name: (value, stamp_us)}`` of the slots of ``blob`` that hold a value."""
    values, stamps = unpack([blob], len(names))
    return {name: (v, s) for name, v, s in zip(names, values[0].tolist(), stamps[0].tolist())
            if s != EMPTY_STAMP}


__all__ = ["SLOT", "EMPTY", "EMPTY_STAMP", "MERGE", "merge_args", "pack",
           "unpack", "fields"]
