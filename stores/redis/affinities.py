"""A viewer's author affinities as one binary string: the layout, its merge script, its reads.

The ranking job reads, per refresh batch, each viewer's affinity to the authors
of its candidates (about 180 per viewer, 46,000 per batch of 256). Held as a
hash of ``"<value>@<stamp>"`` fields, that was an HMGET of 180 fields per
viewer, and the ranker spent more time parsing the replies than scoring the
rows. Held as one string of fixed-size records sorted by author, it is one GET
per viewer, and the batch's values come out of one ``np.frombuffer`` and two
``searchsorted`` (``bench/probe_affinity_layout.py`` measured the floor of
both designs: 8.4 ms against 1.3 ms for 256 viewers).

Each record is ``RECORD`` (24 bytes): the author id as big-endian offset
binary (its sign bit flipped, so that byte order is numeric order and the
script compares it exactly as two unsigned 32-bit halves), then the value
(little-endian double) and its write stamp in microseconds (little-endian
int64), as ``schemas.features.write_stamp_us`` orders them. One record per
author, sorted by author.

    blob = pack([45, 7], [1.5, 0.5], [1_700_000_000_000_000, 1_700_000_000_000_001])
    authors, values, stamps_us = unpack(blob)            # sorted by author
    values, stamps_us = lookup([blob], [7, 45], [0, 1], [0, 2])
"""
from __future__ import annotations

from typing import Sequence

import struct

import numpy as np

RECORD = np.dtype([("author", ">u8"), ("value", "<f8"), ("stamp", "<i8")])
_SIGN = np.uint64(1 << 63)
_OFFSET = 1 << 63  # int64 -> offset binary: the sign bit flipped
#: The stamp of an author the viewer has no record of: older than any TTL reaches.
ABSENT_STAMP = -(1 << 62)
#: A viewer holding more authors than this has its records older than the
#: affinity TTL dropped by the next write that touches it (reads skip them anyway).
PRUNE_AT = 256
#: ``lookup`` finds records through a table of every (viewer, author) cell while it
#: has at most this many cells per pair wanted (or ``_DENSE_MIN``): filling it costs
#: less than a ``searchsorted`` of every pair (about a tenth, 256 viewers x 1,500
#: authors against 46,000 pairs).
_DENSE_PER_QUERY, _DENSE_MIN = 16, 1 << 20

# KEYS[1] a viewer's affinity string. ARGV[1] key TTL in ms, ARGV[2] new records
# (RECORD, sorted by author, one per author), ARGV[3] the oldest stamp a prune
# keeps, ARGV[4] PRUNE_AT. Each new record replaces the stored one of its author
# only when its stamp is later (or equal with a greater value), as the hash
# features' newer-wins; the string is rewritten once. Returns how many were written.
MERGE = """
local old = redis.call('GET', KEYS[1]) or ''
if #old % 24 ~= 0 then
  return redis.error_reply('feedbeam: affinity string of ' .. #old .. ' bytes, not 24-byte records')
end
local new = ARGV[2]
local held = #old / 24
local parts, applied, copied = {}, 0, 0
for j = 0, #new / 24 - 1 do
  local rec = string.sub(new, j * 24 + 1, j * 24 + 24)
  local hi, lo = struct.unpack('>I4>I4', rec)
  local a, b = copied, held
  while a < b do
    local m = math.floor((a + b) / 2)
    local mh, ml = struct.unpack('>I4>I4', old, m * 24 + 1)
    if mh < hi or (mh == hi and ml < lo) then a = m + 1 else b = m end
  end
  parts[#parts + 1] = string.sub(old, copied * 24 + 1, a * 24)
  copied = a
  local write = true
  if a < held then
    local mh, ml, value, stamp = struct.unpack('>I4>I4<d<i8', old, a * 24 + 1)
    if mh == hi and ml == lo then
      local new_value, new_stamp = struct.unpack('<d<i8', rec, 9)
      if stamp > new_stamp or (stamp == new_stamp and value >= new_value) then
        write = false
      end
      if not write then parts[#parts + 1] = string.sub(old, a * 24 + 1, a * 24 + 24) end
      copied = a + 1
    end
  end
  if write then
    parts[#parts + 1] = rec
    applied = applied + 1
  end
end
parts[#parts + 1] = string.sub(old, copied * 24 + 1)
if applied == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 0
end
local out = table.concat(parts)
if #out / 24 > tonumber(ARGV[4]) then
  local oldest, kept = tonumber(ARGV[3]), {}
  for i = 0, #out / 24 - 1 do
    if struct.unpack('<i8', out, i * 24 + 17) >= oldest then
      kept[#kept + 1] = string.sub(out, i * 24 + 1, i * 24 + 24)
    end
  end
  out = table.concat(kept)
end
redis.call('SET', KEYS[1], out, 'PX', ARGV[1])
return applied
"""


_KEY, _VALUE = struct.Struct(">Q"), struct.Struct("<dq")


def pack(authors: Sequence[int | str], values: Sequence[float],
         stamps_us: Sequence[int]) -> bytes:
    """The records of distinct ``authors`` (ids or their decimal text, any order) as
    one string, sorted by author.
    (Packed with ``struct``: a write carries a few records, where NumPy's fixed cost
    per call would dominate.)"""
    records = sorted(zip(map(int, authors), map(float, values), map(int, stamps_us)))
    if any(records[i][0] == records[i - 1][0] for i in range(1, len(records))):
        raise ValueError("affinities.pack: an author appears twice")
    key, value = _KEY.pack, _VALUE.pack
    return b"".join(key(a + _OFFSET) + value(v, s) for a, v, s in records)


def _records(blobs: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Every record of ``blobs`` (None: no records) in one array, and each blob's count."""
    sizes = np.fromiter((len(b) if b else 0 for b in blobs), np.int64, len(blobs))
    if (sizes % RECORD.itemsize).any():
        bad = int(sizes[(sizes % RECORD.itemsize) != 0][0])
        raise ValueError(f"stored affinities of {bad} bytes: not {RECORD.itemsize}-byte records")
    records = np.frombuffer(b"".join(b for b in blobs if b), RECORD)
    return records, sizes // RECORD.itemsize


def _ids(records: np.ndarray) -> np.ndarray:
    return (records["author"].astype(np.uint64) ^ _SIGN).view(np.int64)


def unpack(blob: bytes | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(authors, values, stamps_us)`` of one stored string, sorted by author."""
    records, _ = _records([blob])
    return _ids(records), records["value"].astype(np.float64), records["stamp"].astype(np.int64)


def lookup(blobs: Sequence[bytes | None], authors: Sequence[int], index: Sequence[int],
           bounds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, stamps_us)`` of viewer ``i``'s (``blobs[i]``) records of the authors
    ``authors[j]`` for ``j`` in ``index[bounds[i]:bounds[i + 1]]``, in that order:
    ``0.0`` and ``ABSENT_STAMP`` where it has none (``locate``, then a gather)."""
    records, at = locate(blobs, authors, index, bounds)
    values = np.append(records["value"].astype(np.float64), 0.0)
    stamps = np.append(records["stamp"].astype(np.int64), ABSENT_STAMP)
    return values[at], stamps[at]


def locate(blobs: Sequence[bytes | None], authors: Sequence[int], index: Sequence[int],
           bounds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every record of ``blobs`` (``RECORD``, viewer after viewer), and for each pair
    wanted, viewer ``i`` (``blobs[i]``) and author ``authors[j]`` for ``j`` in
    ``index[bounds[i]:bounds[i + 1]]``, the position of its record, -1 where the
    viewer has none (so a caller may work on the records, then gather from them
    with a default appended). All viewers at once: a record's (viewer, author) and
    each pair wanted become one integer ``viewer * len(authors) + j``, found
    through a table of every such cell while it is small beside the pairs wanted,
    else by one ``searchsorted``."""
    records, counts = _records(blobs)
    wanted = np.asarray(authors, np.int64)
    index = np.asarray(index, np.int64)
    if len(wanted) > 1 and not (np.diff(wanted) > 0).all():  # sorted and distinct, as needed
        wanted, inverse = np.unique(wanted, return_inverse=True)
        index = inverse.reshape(-1)[index]
    width = max(len(wanted), 1)
    held = _ids(records)
    at = np.minimum(np.searchsorted(wanted, held), width - 1)
    known = np.flatnonzero(wanted[at] == held) if len(wanted) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(blobs), dtype=np.int64), counts)
    keys = owner[known] * width + at[known]
    if len(keys) > 1 and not (np.diff(keys) > 0).all():
        raise ValueError("stored affinities are not sorted by author")
    queries = np.repeat(np.arange(len(blobs), dtype=np.int64), np.diff(bounds)) * width + index
    if not len(keys) or not len(queries):
        return records, np.full(len(queries), -1, np.int64)
    cells = len(blobs) * width
    if cells <= max(_DENSE_PER_QUERY * len(queries), _DENSE_MIN) and len(records) < 1 << 31:
        slot = np.full(cells, -1, np.int32)
        slot[keys] = known
        return records, slot[queries]
    found = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return records, np.where(keys[found] == queries, known[found], -1)


__all__ = ["RECORD", "ABSENT_STAMP", "PRUNE_AT", "MERGE", "pack", "unpack", "lookup", "locate"]
