"""The text layout of the online features before 2026-12-06, for the probes that measure against it.

Until then every feature key was a hash, each field ``"<value>@<write stamp
us>"``, written newer-wins by ``WRITE_NEWER`` and parsed in bulk by
``parse_stamped``. The store now keeps binary strings (``stores.redis.slots``,
``stores.redis.affinities``); ``probe_affinity_layout.py`` and
``probe_hash_reads.py`` still load this layout to show what it cost.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

# KEYS[1] a feature hash. ARGV[1] key TTL in ms, then (field, value, stamp) triples.
# Writes a field only when its stamp is later than the stored one (or equal with
# a greater value); returns how many fields were written.
WRITE_NEWER = """
local applied = 0
for i = 2, #ARGV, 3 do
  local stamp = tonumber(ARGV[i + 2])
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local write = true
  if stored then
    local at = string.find(stored, '@', 1, true)
    local stored_stamp = tonumber(string.sub(stored, at + 1))
    if stored_stamp > stamp then
      write = false
    elseif stored_stamp == stamp
        and tonumber(string.sub(stored, 1, at - 1)) >= tonumber(ARGV[i + 1]) then
      write = false
    end
  end
  if write then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '@' .. ARGV[i + 2])
    applied = applied + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return applied
"""


#: ``parse_stamped``'s reading of ``value@stamp`` lines: two columns, no quoting, no
#: null spellings (a stored "nan" is a float NaN).
_STAMPED_READ = pa_csv.ReadOptions(column_names=["value", "stamp"], use_threads=False)
_STAMPED_PARSE = pa_csv.ParseOptions(delimiter="@", quote_char=False)
_STAMPED_TYPES = pa_csv.ConvertOptions(column_types={"value": pa.float64(), "stamp": pa.int64()},
                                       null_values=[], strings_can_be_null=False)


def parse_stamped(raw: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid_at_ms)`` of stored fields ``b"<value>@<stamp us>"``, parsed in
    one pass over all of them (what the ranker's batched reads did): the fields joined as
    lines and read by Arrow's CSV reader, 3-4 times faster than NumPy's conversion of
    the split strings (``bench/probe_hash_reads.py``)."""
    if not raw:
        return np.zeros(0), np.zeros(0, np.int64)
    try:
        table = pa_csv.read_csv(io.BytesIO(b"\n".join(raw)), read_options=_STAMPED_READ,
                                parse_options=_STAMPED_PARSE, convert_options=_STAMPED_TYPES)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"stored feature values are not all '<value>@<stamp>': {exc}") from None
    return (table.column(0).to_numpy().astype(np.float64, copy=False),
            table.column(1).to_numpy() // 1000)


__all__ = ["WRITE_NEWER", "parse_stamped"]
