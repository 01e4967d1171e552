"""The features pipeline's aggregation a batch at a time: plain Python and NumPy, no I/O.

    agg = FeatureAggregator(FeatureParams())
    applied = agg.apply(items)      # one batch of ItemColumns -> values, too-late rows, counts
    values = agg.fire(until_ms)     # the watermark passed until_ms -> the values due by then
    same = FeatureAggregator.restore(params, agg.export())   # the state as columns, and back

The rules are those of ``domain.features`` (windows as change points,
lateness, unlikes, dedup, versions, affinity), whose per-event stages stay the
reference: ``tests/unit/test_feature_aggregator.py`` checks that both give
the same values. The layout differs, so that a batch costs what the batch
holds and not what the state holds (docs/pipelines/features.md, "State
layout"): every entity's numbers live in NumPy columns behind a dict from id
to row, a window's value is a running sum that changes only at its change
points, and one agenda of times says what changes when.
"""
from __future__ import annotations

import dataclasses
import heapq
from itertools import compress
from typing import Callable, NamedTuple, Sequence

import numpy as np

from domain.features import (
    A_ENGAGED,
    A_POSTS,
    A_VIEWS,
    AFFINITY_EPSILON,
    LIKE,
    POST_CREATED,
    PROFILE_VIEW,
    UNLIKE,
    VIEW,
    FeatureParams,
    WindowSpec,
)
from schemas.features import (
    AFFINITY,
    AUTHOR,
    AUTHOR_FEATURES,
    DAY_MS,
    ENTITY_TYPES,
    FEATURE_NAMES,
    POST,
    POST_FEATURES,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    FeatureColumns,
)

_NONE = -(2**62)  # "no time" in int64 columns of times
_NEVER = 2**62  # "no flush pending"
#: What ``Applied.counts`` counts.
COUNTS = ("counted", "late", "too_late", "duplicate", "unlikes_unmatched")


@dataclasses.dataclass(slots=True)
class ItemColumns:
    """One batch of events as parallel int64 columns (the aggregation's input).

    ``kind`` and ``media`` are the codes of ``domain.features`` (``POST_CREATED``
    for a post's creation), -1 meaning "none" in ``post``, ``media`` and
    ``dwell``; ``ids`` are the events' ``event_id``s as UTF-8 bytes.
    """

    kind: np.ndarray
    t: np.ndarray
    viewer: np.ndarray
    author: np.ndarray
    post: np.ndarray
    media: np.ndarray
    dwell: np.ndarray
    ids: list

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, kind, t, viewer, author, post, media, dwell, ids) -> "ItemColumns":
        """Columns from sequences (lists or arrays) of equal length."""
        return cls(*(np.asarray(c, dtype=np.int64) for c in (kind, t, viewer, author, post,
                                                               media, dwell)), list(ids))

    @classmethod
    def empty(cls) -> "ItemColumns":
        return cls.of([], [], [], [], [], [], [], [])

    def select(self, rows) -> "ItemColumns":
        """The events at ``rows`` (positions or a boolean mask), in order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return ItemColumns(*(c[rows] for c in self.arrays()),
                           [self.ids[i] for i in rows.tolist()])

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.kind, self.t, self.viewer, self.author, self.post, self.media, self.dwell)


class Applied(NamedTuple):
    """What ``FeatureAggregator.apply`` did with a batch."""

    values: FeatureColumns  # re-emitted by late events (and by posts created past their point)
    too_late: list  # positions in the batch of the events that are too late (to dead-letter)
    counts: dict  # COUNTS


# -- helpers ------------------------------------------------------------------------------


class _Rows:
    """Named NumPy columns sharing one row numbering; released rows are reused."""

    def __init__(self, columns: dict[str, tuple]):
        self._spec = columns
        self.top = 0
        self.free: list[int] = []
        for name, (dtype, shape) in columns.items():
            setattr(self, name, np.zeros((0, *shape), dtype))

    def alloc(self, k: int) -> np.ndarray:
        """``k`` free rows (zeroed)."""
        reused = self.free[len(self.free) - k:] if k <= len(self.free) else self.free[:]
        del self.free[len(self.free) - len(reused):]
        fresh = k - len(reused)
        if self.top + fresh > len(getattr(self, next(iter(self._spec)))):
            self._grow(self.top + fresh)
        rows = np.concatenate([np.array(reused, dtype=np.int64),
                               np.arange(self.top, self.top + fresh, dtype=np.int64)])
        self.top += fresh
        return rows

    def _grow(self, need: int) -> None:
        cap = max(1024, 2 * need)
        for name, (dtype, shape) in self._spec.items():
            old = getattr(self, name)
            new = np.zeros((cap, *shape), dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def release(self, rows) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        for name in self._spec:
            getattr(self, name)[rows] = 0
        self.free.extend(rows.tolist())

    def alive(self) -> np.ndarray:
        mask = np.ones(self.top, dtype=bool)
        mask[self.free] = False
        return mask

    def export(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name)[:self.top].copy() for name in self._spec}
        for name, col in out.items():
            if col.ndim > 2:
                out[name] = col.reshape(len(col), int(np.prod(col.shape[1:])))
        out["alive"] = self.alive()
        return out

    def restore(self, table: dict[str, np.ndarray]) -> None:
        alive = np.asarray(table["alive"], dtype=bool)
        self.top = len(alive)
        for name, (dtype, shape) in self._spec.items():
            col = np.zeros((max(1024, self.top), *shape), dtype)
            col[:self.top] = np.asarray(table[name], dtype).reshape((self.top, *shape))
            setattr(self, name, col)
        self.free = np.flatnonzero(~alive)[::-1].tolist()


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of parallel key columns: ``(first, group)``, the position of each
    distinct row's first occurrence and, for every row, the number of its distinct row."""
    n = len(keys[0])
    order = np.lexsort(keys[::-1])
    new = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            sk = k[order]
            same &= sk[1:] == sk[:-1]
        new[1:] = ~same
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    return order[new], group


def _lookup(index: dict, keys: list) -> tuple[list, list[int]]:
    """``index``'s value for each key (None when absent) and the positions of the absent."""
    get = index.get
    rows = [get(k) for k in keys]
    return rows, [i for i, r in enumerate(rows) if r is None]


class _Out:
    """Emitted values collected as column chunks."""

    def __init__(self):
        self.parts: list[FeatureColumns] = []

    def add(self, entity_type: int, entity: np.ndarray, other, names, values: np.ndarray,
            valid_at, version) -> None:
        n = len(values)
        if n:
            self.parts.append(FeatureColumns(
                np.full(n, entity_type, np.int8), np.asarray(entity, np.int64),
                np.broadcast_to(np.asarray(other, np.int64), (n,)).copy(),
                np.broadcast_to(np.asarray(names, np.int16), (n,)).copy(),
                np.asarray(values, np.float64),
                np.broadcast_to(np.asarray(valid_at, np.int64), (n,)).copy(),
                np.broadcast_to(np.asarray(version, np.int64), (n,)).copy()))

    def columns(self) -> FeatureColumns:
        return FeatureColumns.concat(self.parts)


class _Schedule:
    """The times something is due at, earliest first (a heap holding each time once)."""

    def __init__(self):
        self._heap: list[int] = []
        self._times: set[int] = set()

    def add(self, at: int) -> None:
        if at not in self._times:
            self._times.add(at)
            heapq.heappush(self._heap, at)

    def next(self) -> int | None:
        return self._heap[0] if self._heap else None

    def pop_until(self, until: int) -> int | None:
        if self._heap and self._heap[0] <= until:
            at = heapq.heappop(self._heap)
            self._times.discard(at)
            return at
        return None

    def export(self) -> np.ndarray:
        return np.array(sorted(self._times), dtype=np.int64)

    def restore(self, times) -> None:
        self._times = set(np.asarray(times, dtype=np.int64).tolist())
        self._heap = sorted(self._times)


# -- feature functions on columns --------------------------------------------------------


def _rate(engaged: np.ndarray, views: np.ndarray) -> np.ndarray:
    out = np.zeros(len(views), dtype=np.float64)
    np.divide(engaged, views, out=out, where=views > 0)
    return out


def post_values(win: np.ndarray) -> np.ndarray:
    """``POST_FEATURES`` of posts from their window sums ``(posts, 2, 6)`` (1 h and 24 h;
    like, comment, share, save, view, version)."""
    short = win[:, 0, :5].astype(np.float64)
    day = win[:, 1, :5].astype(np.float64)
    return np.column_stack([short, day, _rate(short[:, :4].sum(axis=1), short[:, 4]),
                            _rate(day[:, :4].sum(axis=1), day[:, 4])])


def author_values(win: np.ndarray) -> np.ndarray:
    """``AUTHOR_FEATURES`` of authors from their 7-day sums ``(authors, 1, 4)``
    (engaged, views, posts, version)."""
    w = win[:, 0].astype(np.float64)
    return np.column_stack([_rate(w[:, A_ENGAGED], w[:, A_VIEWS]), w[:, A_POSTS]])


# -- sliding windows as running sums -------------------------------------------------------

_ENTER, _LEAVE, _TOUCH, _EXPIRE = range(4)


class _Windows:
    """The sliding windows of one entity type (posts or authors).

    A *cell* counts the events of one entity in one bucket of ``slide``
    (counters plus a version column: how many events). A cancelled like is a
    cell of its own (-1 like, +1 version) that counts from the first window
    end after the unlike. A cell is in the window of width ``W`` ending at
    ``end`` from its ``enter`` (``start + slide``, or a cancel's) until
    ``start + W + slide``: an entity's running sum per window changes only at
    those times (its change points), when the agenda applies the cell. Each
    entity keeps the values it last emitted, so a change point emits only the
    names that changed. An update to a cell that already entered a window (a
    late event) patches the sums at once and re-emits the passed change points
    it affects, with their higher version.
    """

    def __init__(self, spec: WindowSpec, entity_type: str, names: Sequence[str],
                 values: Callable[[np.ndarray], np.ndarray], schedule: _Schedule):
        self.slide = spec.slide
        self.widths = spec.widths
        self.widest = max(spec.widths)
        self.widest_index = spec.widths.index(self.widest)
        self.nw = len(spec.widths)
        self.ver = spec.n  # the version column
        self.ncol = spec.n + 1
        self.retention = spec.retention
        self.type_code = ENTITY_TYPES.index(entity_type)
        self.name_codes = np.array([FEATURE_NAMES.index(n) for n in names], dtype=np.int16)
        self.values = values
        self.schedule = schedule
        self.index: dict[int, int] = {}  # entity id -> row
        self.ents = _Rows({"id": (np.int64, ()), "win": (np.int64, (self.nw, self.ncol)),
                           "last": (np.float64, (len(names),)), "has_last": (np.bool_, ()),
                           "cells": (np.int64, ()), "touch": (np.int64, ())})
        self.cells: dict[tuple, int] = {}  # (id, start), for cancels (id, start, enter) -> row
        self.cell = _Rows({"ent": (np.int64, ()), "start": (np.int64, ()),
                           "enter": (np.int64, ()), "counts": (np.int64, (self.ncol,)),
                           "cancel": (np.bool_, ())})
        self.cancels_of: dict[int, list[int]] = {}  # entity row -> its cancel cells
        # time -> [entering cells, leaving cells per window, touched entities, expired cells]
        self.ops: dict[int, list] = {}

    # -- agenda

    def _slot(self, at: int) -> list:
        slot = self.ops.get(at)
        if slot is None:
            slot = self.ops[at] = [[], [[] for _ in range(self.nw)], [], []]
            self.schedule.add(at)
        return slot

    def _plan(self, op: int, times: np.ndarray, rows: np.ndarray, window: int = 0) -> None:
        if not len(rows):
            return
        distinct = np.unique(times).tolist()
        for at in distinct:
            chunk = rows if len(distinct) == 1 else rows[times == at]
            slot = self._slot(at)
            (slot[_LEAVE][window] if op == _LEAVE else slot[op]).extend(chunk.tolist())

    def _entities(self, ids: np.ndarray) -> np.ndarray:
        keys = ids.tolist()
        rows, missing = _lookup(self.index, keys)
        if missing:
            fresh = list(dict.fromkeys(keys[i] for i in missing))
            new = self.ents.alloc(len(fresh))
            self.ents.id[new] = fresh
            self.index.update(zip(fresh, new.tolist()))
            rows = [self.index[k] for k in keys]
        return np.array(rows, dtype=np.int64)

    def _rows(self, entities: np.ndarray, starts: np.ndarray, enters: np.ndarray | None,
              fired: int | None) -> np.ndarray:
        """The cells of ``(entity, start)`` (``enters`` given: cancel cells), made when new."""
        cancel = enters is not None
        if not cancel:
            enters = starts + self.slide
        cols = (entities, starts, enters) if cancel else (entities, starts)
        first, group = _groups(*cols)
        keys = list(zip(*(c[first].tolist() for c in cols)))
        rows, missing = _lookup(self.cells, keys)
        if missing:
            at = first[missing]
            new = self._new_cells([keys[i] for i in missing], entities[at], starts[at],
                                  enters[at], cancel, fired)
            for i, row in zip(missing, new.tolist()):
                rows[i] = row
        return np.array(rows, dtype=np.int64)[group]

    def _new_cells(self, keys: list, entities: np.ndarray, starts: np.ndarray,
                   enters: np.ndarray, cancel: bool, fired: int | None) -> np.ndarray:
        ents = self._entities(entities)
        rows = self.cell.alloc(len(keys))
        c = self.cell
        c.ent[rows], c.start[rows], c.enter[rows], c.cancel[rows] = ents, starts, enters, cancel
        self.cells.update(zip(keys, rows.tolist()))
        np.add.at(self.ents.cells, ents, 1)
        if cancel:
            for ent, row in zip(ents.tolist(), rows.tolist()):
                self.cancels_of.setdefault(ent, []).append(row)
        ahead = np.ones(len(rows), dtype=bool) if fired is None else enters > fired
        self._plan(_ENTER, enters[ahead], rows[ahead])
        for w, width in enumerate(self.widths):
            leave = starts + width + self.slide
            due = (enters < leave) & (True if fired is None else leave > fired)
            self._plan(_LEAVE, leave[due], rows[due], w)
        self._plan(_EXPIRE, starts + self.retention, rows)
        return rows

    def touch(self, entity: int, at: int) -> None:
        """Evaluate ``entity`` at ``at`` (a created post: its values start there). The
        entity is kept (with the values it emitted) at least a retention longer."""
        ent = int(self._entities(np.array([entity]))[0])
        self.ents.touch[ent] += 2
        self._slot(at)[_TOUCH].append(ent)
        self._slot(at + self.retention)[_TOUCH].append(-1 - ent)  # a release, no evaluation

    # -- counting

    def add(self, entities: np.ndarray, t: np.ndarray, cols, fired: int | None,
            out: _Out) -> None:
        """Count one event per row: entity, time, counter column."""
        if not len(entities):
            return
        starts = t - t % self.slide
        rows = self._rows(entities, starts, None, fired)
        cols = np.broadcast_to(np.asarray(cols, dtype=np.int64), rows.shape)
        counts = self.cell.counts
        np.add.at(counts, (rows, cols), 1)
        np.add.at(counts, (rows, self.ver), 1)
        if fired is not None:
            late = starts + self.slide <= fired
            if late.any():
                self._patch_late(rows[late], cols[late], 1, t[late], fired, out)

    def cancel(self, entities: np.ndarray, like_t: np.ndarray, cancel_t: np.ndarray,
               fired: int | None, out: _Out) -> None:
        """A like at ``like_t`` of each entity stops counting from ``cancel_t`` on."""
        if not len(entities):
            return
        sl = self.slide
        starts = like_t - like_t % sl
        enters = np.maximum(starts, cancel_t - cancel_t % sl) + sl
        rows = self._rows(entities, starts, enters, fired)
        counts = self.cell.counts
        np.add.at(counts, (rows, 0), -1)  # likes, and an author's engagement, are column 0
        np.add.at(counts, (rows, self.ver), 1)
        if fired is not None:
            late = enters <= fired
            if late.any():
                self._patch_late(rows[late], np.zeros(int(late.sum()), np.int64), -1,
                                 cancel_t[late], fired, out)

    def _patch_late(self, rows: np.ndarray, cols: np.ndarray, delta: int, ts: np.ndarray,
                    fired: int, out: _Out) -> None:
        """Updates to cells that already entered a window (late events): patch the running
        sums, re-emit the passed change points they affect (every name, the version up)."""
        ents, ws, cs, deltas = [], [], [], []
        since: dict[int, list[tuple[int, int]]] = {}  # entity row -> (t, horizon)
        c = self.cell
        for row, col, t in zip(rows.tolist(), cols.tolist(), ts.tolist()):
            ent = int(c.ent[row])
            start = int(c.start[row])
            for w, width in enumerate(self.widths):
                if fired < start + width + self.slide:
                    ents += (ent, ent)
                    ws += (w, w)
                    cs += (col, self.ver)
                    deltas += (delta, 1)
            horizon = t - t % self.slide + self.widest + self.slide
            since.setdefault(ent, []).append((t, horizon))
        if ents:
            np.add.at(self.ents.win, (np.array(ents), np.array(ws), np.array(cs)),
                      np.array(deltas))
        for ent, ranges in since.items():
            points = sorted(p for p in self._points(ent, min(t for t, _ in ranges), fired)
                            if any(t < p <= h for t, h in ranges))
            for p in points:
                self._emit_all(ent, p, self._sums_at(ent, p), out)
            if self.ents.has_last[ent]:
                self.ents.last[ent] = self.values(self.ents.win[ent:ent + 1])[0]

    def _cells_of(self, ent: int, lo: int, hi: int) -> list[int]:
        """The entity's cells starting in ``[lo, hi]`` (a scan of its buckets: late path only)."""
        entity = int(self.ents.id[ent])
        get = self.cells.get
        rows = [get((entity, s)) for s in range(lo - lo % self.slide, hi + 1, self.slide)]
        return [r for r in rows if r is not None] + [
            r for r in self.cancels_of.get(ent, ()) if lo <= self.cell.start[r] <= hi]

    def _points(self, ent: int, since: int, until: int) -> set[int]:
        c = self.cell
        points = set()
        for row in self._cells_of(ent, since - self.widest - self.slide, until):
            start, enter = int(c.start[row]), int(c.enter[row])
            points.add(enter)
            for width in self.widths:
                if enter < start + width + self.slide:
                    points.add(start + width + self.slide)
        return {p for p in points if since < p <= until}

    def _sums_at(self, ent: int, at: int) -> np.ndarray:
        """The entity's window sums at window end ``at``, from its cells."""
        win = np.zeros((1, self.nw, self.ncol), dtype=np.int64)
        c = self.cell
        for row in self._cells_of(ent, at - self.widest - self.slide, at):
            start, enter = int(c.start[row]), int(c.enter[row])
            for w, width in enumerate(self.widths):
                if enter <= at < start + width + self.slide:
                    win[0, w] += c.counts[row]
        return win

    def _emit_all(self, ent: int, at: int, win: np.ndarray, out: _Out) -> None:
        values = self.values(win)[0]
        out.add(self.type_code, np.full(len(values), self.ents.id[ent]), -1, self.name_codes,
                values, at, win[0, self.widest_index, self.ver])

    def values_at(self, entity: int, at: int, out: _Out) -> None:
        """Emit every value of ``entity`` at a window end that has passed."""
        ent = self.index.get(entity)
        win = (np.zeros((1, self.nw, self.ncol), dtype=np.int64) if ent is None
               else self._sums_at(ent, at))
        values = self.values(win)[0]
        out.add(self.type_code, np.full(len(values), entity), -1, self.name_codes, values, at,
                win[0, self.widest_index, self.ver])

    # -- firing

    def fire(self, at: int, out: _Out) -> None:
        slot = self.ops.pop(at, None)
        if slot is None:
            return
        entering, leaving, touched, expired = slot
        c, e = self.cell, self.ents
        affected = []
        if entering:
            rows = np.array(entering, dtype=np.int64)
            ents = c.ent[rows]
            for w, width in enumerate(self.widths):
                inside = c.start[rows] + width + self.slide > at
                np.add.at(e.win, (ents[inside], w), c.counts[rows[inside]])
            affected.append(ents)
        for w, cells in enumerate(leaving):
            if cells:
                rows = np.array(cells, dtype=np.int64)
                ents = c.ent[rows]
                np.add.at(e.win, (ents, w), -c.counts[rows])
                affected.append(ents)
        released = np.empty(0, dtype=np.int64)
        if touched:
            ents = np.array(touched, dtype=np.int64)
            releases = ents < 0
            ents, released = ents[~releases], -1 - ents[releases]
            np.add.at(e.touch, ents, -1)
            np.add.at(e.touch, released, -1)
            affected.append(ents)
        if affected:
            self._evaluate(np.unique(np.concatenate(affected)), at, out)
        if expired:
            self._expire(np.array(expired, dtype=np.int64))
        if len(released):
            self._release_idle(np.unique(released))

    def _evaluate(self, ents: np.ndarray, at: int, out: _Out) -> None:
        e = self.ents
        win = e.win[ents]
        values = self.values(win)
        changed = (values != e.last[ents]) | ~e.has_last[ents][:, None]
        rows, names = np.nonzero(changed)
        if len(rows):
            out.add(self.type_code, e.id[ents][rows], -1, self.name_codes[names],
                    values[rows, names], at, win[rows, self.widest_index, self.ver])
        e.last[ents] = values
        e.has_last[ents] = True

    def _expire(self, rows: np.ndarray) -> None:
        c, e = self.cell, self.ents
        ents = c.ent[rows]
        ids = e.id[ents].tolist()
        cancels = c.cancel[rows]
        if cancels.any():
            for row, ent, entity, start, enter in zip(
                    rows[cancels].tolist(), ents[cancels].tolist(),
                    compress(ids, cancels.tolist()), c.start[rows][cancels].tolist(),
                    c.enter[rows][cancels].tolist()):
                del self.cells[(entity, start, enter)]
                rest = [r for r in self.cancels_of[ent] if r != row]
                if rest:
                    self.cancels_of[ent] = rest
                else:
                    del self.cancels_of[ent]
        cells = self.cells
        for key in zip(compress(ids, (~cancels).tolist()), c.start[rows][~cancels].tolist()):
            del cells[key]
        np.add.at(e.cells, ents, -1)
        c.release(rows)
        self._release_idle(np.unique(ents))

    def _release_idle(self, ents: np.ndarray) -> None:
        """Forget the entities of ``ents`` with no cell and nothing pending (their zeros
        emitted): a later event starts them afresh."""
        e = self.ents
        idle = [ent for ent in ents[(e.cells[ents] == 0) & (e.touch[ents] == 0)].tolist()
                if self.index.get(int(e.id[ent])) == ent]  # not released already
        for ent in idle:
            del self.index[int(e.id[ent])]
        if idle:
            e.release(idle)

    # -- state as columns

    def export(self) -> dict[str, dict[str, np.ndarray]]:
        times, ops, rows, windows = [], [], [], []
        for at, (entering, leaving, touched, expired) in self.ops.items():
            for op, items, w in ((_ENTER, entering, 0), (_TOUCH, touched, 0),
                                 (_EXPIRE, expired, 0),
                                 *((_LEAVE, cells, w) for w, cells in enumerate(leaving))):
                times += [at] * len(items)
                ops += [op] * len(items)
                rows += items
                windows += [w] * len(items)
        return {"entities": self.ents.export(), "cells": self.cell.export(),
                "agenda": {"at": np.array(times, np.int64), "op": np.array(ops, np.int8),
                           "row": np.array(rows, np.int64), "window": np.array(windows, np.int8)}}

    def restore(self, tables: dict[str, dict[str, np.ndarray]]) -> None:
        self.ents.restore(tables["entities"])
        self.cell.restore(tables["cells"])
        e, c = self.ents, self.cell
        alive = np.flatnonzero(e.alive())
        self.index = dict(zip(e.id[alive].tolist(), alive.tolist()))
        live = np.flatnonzero(c.alive())
        self.cells, self.cancels_of = {}, {}
        for row, entity, ent, start, enter, cancel in zip(
                live.tolist(), e.id[c.ent[live]].tolist(), c.ent[live].tolist(),
                c.start[live].tolist(), c.enter[live].tolist(), c.cancel[live].tolist()):
            if cancel:
                self.cells[(entity, start, enter)] = row
                self.cancels_of.setdefault(ent, []).append(row)
            else:
                self.cells[(entity, start)] = row
        self.ops = {}
        agenda = tables["agenda"]
        for at, op, row, w in zip(*(np.asarray(agenda[k]).tolist()
                                    for k in ("at", "op", "row", "window"))):
            slot = self._slot(at)
            (slot[_LEAVE][w] if op == _LEAVE else slot[op]).append(row)

    def __len__(self) -> int:
        return len(self.index)


# -- decayed affinities ----------------------------------------------------------------------


class _Pairs:
    """Decayed sums of one kind of viewer pair (viewer-author or viewer-media), as columns:
    ``score`` as of ``ref`` (the pair's latest event), ``events`` summed, ``dirty`` (changed
    since emitted), and ``vrow``, the viewer's row in ``_Viewers``."""

    def __init__(self, entity_type: str, half_life_ms: int, viewers: "_Viewers"):
        self.type_code = ENTITY_TYPES.index(entity_type)
        self.half_life = half_life_ms
        self.viewers = viewers
        self.index: dict[tuple[int, int], int] = {}
        self.rows = _Rows({"viewer": (np.int64, ()), "other": (np.int64, ()),
                           "vrow": (np.int64, ()), "score": (np.float64, ()),
                           "ref": (np.int64, ()), "events": (np.int64, ()),
                           "dirty": (np.bool_, ())})
        self.pending: list[np.ndarray] = []  # rows made dirty, waiting for their flush

    def rows_of(self, viewers: np.ndarray, others: np.ndarray) -> np.ndarray:
        """The rows of ``(viewers[i], others[i])``, made when new."""
        first, group = _groups(viewers, others)
        keys = list(zip(viewers[first].tolist(), others[first].tolist()))
        rows, missing = _lookup(self.index, keys)
        if missing:
            r = self.rows
            new = r.alloc(len(missing))
            at = first[missing]
            r.viewer[new], r.other[new], r.ref[new] = viewers[at], others[at], _NONE
            vrows = self.viewers.rows_of(viewers[at])
            r.vrow[new] = vrows
            np.add.at(self.viewers.rows.pairs, vrows, 1)
            for i, row in zip(missing, new.tolist()):
                rows[i] = self.index[keys[i]] = row
        return np.array(rows, dtype=np.int64)[group]

    def add(self, rows: np.ndarray, t: np.ndarray, w: np.ndarray) -> None:
        """Add weights ``w`` at times ``t`` to ``rows`` (decayed to each pair's newest time)."""
        r = self.rows
        uniq, inv = np.unique(rows, return_inverse=True)
        newest = np.full(len(uniq), _NONE, dtype=np.int64)
        np.maximum.at(newest, inv, t)
        old_ref = r.ref[uniq]
        ref = np.maximum(old_ref, newest)
        added = np.zeros(len(uniq), dtype=np.float64)
        np.add.at(added, inv, w * np.exp2((t - ref[inv]) / self.half_life))
        # A new row's score is 0 and its ref _NONE: it stays 0 before ``added``.
        r.score[uniq] = r.score[uniq] * np.exp2((old_ref - ref) / self.half_life) + added
        r.ref[uniq] = ref
        r.events[uniq] += np.bincount(inv)
        fresh = uniq[~r.dirty[uniq]]
        r.dirty[fresh] = True
        if len(fresh):
            self.pending.append(fresh)

    def flush(self, until: int, out: _Out) -> np.ndarray:
        """Emit the dirty pairs of viewers whose flush is due by ``until``; returns those
        viewers' rows."""
        if not self.pending:
            return np.empty(0, dtype=np.int64)
        r = self.rows
        rows = np.concatenate(self.pending)
        rows = rows[r.dirty[rows]]
        due = self.viewers.rows.flush[r.vrow[rows]] <= until
        self.pending = [rows[~due]] if (~due).any() else []
        rows = rows[due]
        if len(rows):
            rows = rows[np.lexsort((r.other[rows], r.viewer[rows]))]
            score = r.score[rows]
            out.add(self.type_code, r.viewer[rows], r.other[rows],
                    FEATURE_NAMES.index(AFFINITY),
                    np.where(score > AFFINITY_EPSILON, score, 0.0), r.ref[rows], r.events[rows])
            r.dirty[rows] = False
        return r.vrow[rows]

    def expire(self, cutoff: int) -> int | None:
        """Forget the pairs whose latest event is before ``cutoff``; returns the oldest
        ``ref`` left (None when none is)."""
        r = self.rows
        alive = r.alive()
        top = r.top
        old = np.flatnonzero(alive & (r.ref[:top] < cutoff) & ~r.dirty[:top])
        if len(old):
            for key in zip(r.viewer[old].tolist(), r.other[old].tolist()):
                del self.index[key]
            vrows = r.vrow[old]
            np.add.at(self.viewers.rows.pairs, vrows, -1)
            self.viewers.release_idle(np.unique(vrows))
            r.release(old)
            alive[old] = False
        return int(r.ref[:top][alive].min()) if alive.any() else None

    def export(self) -> dict[str, np.ndarray]:
        return self.rows.export()

    def restore(self, table: dict[str, np.ndarray]) -> None:
        self.rows.restore(table)
        r = self.rows
        alive = np.flatnonzero(r.alive())
        self.index = dict(zip(zip(r.viewer[alive].tolist(), r.other[alive].tolist()),
                              alive.tolist()))
        dirty = alive[r.dirty[alive]]
        self.pending = [dirty] if len(dirty) else []

    def __len__(self) -> int:
        return len(self.index)


class _Viewers:
    """One row per viewer with pairs: when its changed pairs are emitted next (``flush``,
    ``_NEVER`` when none is pending) and how many pairs it has."""

    def __init__(self):
        self.index: dict[int, int] = {}
        self.rows = _Rows({"id": (np.int64, ()), "flush": (np.int64, ()),
                           "pairs": (np.int64, ())})

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        keys = ids.tolist()
        rows, missing = _lookup(self.index, keys)
        if missing:
            fresh = list(dict.fromkeys(keys[i] for i in missing))
            new = self.rows.alloc(len(fresh))
            self.rows.id[new] = fresh
            self.rows.flush[new] = _NEVER
            self.index.update(zip(fresh, new.tolist()))
            rows = [self.index[k] for k in keys]
        return np.array(rows, dtype=np.int64)

    def release_idle(self, vrows: np.ndarray) -> None:
        r = self.rows
        idle = vrows[(r.pairs[vrows] == 0) & (r.flush[vrows] == _NEVER)]
        for viewer in r.id[idle].tolist():
            del self.index[viewer]
        if len(idle):
            r.release(idle)

    def restore(self, table: dict[str, np.ndarray]) -> None:
        self.rows.restore(table)
        alive = np.flatnonzero(self.rows.alive())
        self.index = dict(zip(self.rows.id[alive].tolist(), alive.tolist()))


# -- the aggregator -----------------------------------------------------------------------------


class FeatureAggregator:
    """Every feature of one shard of entities, a batch at a time (see the module doc).

    ``fired`` is the latest time the watermark is known to have passed (the
    last ``fire``): an event more than the allowed lateness behind it is too
    late, and an update behind it is late.
    """

    def __init__(self, params: FeatureParams):
        self.params = params
        self.fired: int | None = None
        self._schedule = _Schedule()
        self.posts = _Windows(params.post_spec, POST, POST_FEATURES, post_values,
                              self._schedule)
        self.authors = _Windows(params.author_spec, AUTHOR, AUTHOR_FEATURES, author_values,
                                self._schedule)
        self.viewers = _Viewers()
        self.viewer_authors = _Pairs(VIEWER_AUTHOR, params.half_life_ms, self.viewers)
        self.viewer_media = _Pairs(VIEWER_MEDIA, params.half_life_ms, self.viewers)
        # Weight per kind code (views are scaled by dwell on top).
        self._weights = np.array([params.weights.get(k, 0.0) for k in range(POST_CREATED + 1)])
        # Dedup: ids remembered by the slide of their event.
        self.seen: set[bytes] = set()
        self.seen_by_bucket: dict[int, list[bytes]] = {}
        # Unpaired likes and unlikes per (first-stage key, viewer), and by slide to forget them.
        self.likes: dict[tuple[int, int], list[int]] = {}
        self.unlikes: dict[tuple[int, int], list[int]] = {}
        self.pairs_by_bucket: dict[int, list[tuple[int, int]]] = {}
        self.next_expiry: int | None = None

    # -- input

    def apply(self, items: ItemColumns) -> Applied:
        """Apply one batch, in its order (see ``domain.features`` for the rules).

        Decisions that depend on order within the batch are taken in order (of
        a repeated ``event_id`` the first counts; likes and unlikes pair in
        arrival order); counting is order-free, so the rest works on columns.
        """
        p = self.params
        fired = self.fired
        n = len(items)
        if not n:
            return Applied(FeatureColumns.empty(), [], dict.fromkeys(COUNTS, 0))
        kind, t = items.kind, items.t
        ids = items.ids
        known = np.fromiter(map(self.seen.__contains__, ids), dtype=bool, count=n)
        if len(set(ids)) < n:  # a repeat within the batch: only the first occurrence counts
            first: dict = {}
            for i, eid in enumerate(ids):
                if first.setdefault(eid, i) != i:
                    known[i] = True
        slide = p.slide_ms
        end = t - t % slide + slide  # the end of each event's slide
        if fired is None:
            too_late = np.zeros(n, dtype=bool)
            accepted = ~known
            late = 0
        else:
            too_late = ~known & (t + p.allowed_lateness_ms < fired)
            accepted = ~known & ~too_late
            late = int(np.count_nonzero(accepted & (end <= fired)))
        self._remember(ids, accepted, end, fired)
        out = _Out()
        cancels: list[tuple] = []
        pairing = np.flatnonzero(accepted & ((kind == LIKE) | (kind == UNLIKE)))
        unmatched = self._pair(items, pairing, cancels) if len(pairing) else 0
        created = np.flatnonzero(accepted & (kind == POST_CREATED))
        for i in created.tolist():
            at = int(end[i])
            if fired is not None and at <= fired:
                self.posts.values_at(int(items.post[i]), at, out)
            else:
                self.posts.touch(int(items.post[i]), at)
        engaged = np.flatnonzero(accepted & (kind <= VIEW))  # like .. view
        on_post = engaged[items.post[engaged] >= 0]
        self.posts.add(items.post[on_post], t[on_post], kind[on_post], fired, out)
        by_author = np.concatenate([engaged, created])
        author_kind = kind[by_author]
        self.authors.add(items.author[by_author], t[by_author],
                         np.where(author_kind == VIEW, A_VIEWS,
                                  np.where(author_kind == POST_CREATED, A_POSTS, A_ENGAGED)),
                         fired, out)
        self._affinities(items, accepted, cancels, fired, out)
        return Applied(out.columns(), np.flatnonzero(too_late).tolist(),
                       {"counted": int(np.count_nonzero(accepted)) - late, "late": late,
                        "too_late": int(np.count_nonzero(too_late)),
                        "duplicate": int(np.count_nonzero(known)),
                        "unlikes_unmatched": unmatched})

    def _remember(self, ids: list, accepted: np.ndarray, end: np.ndarray,
                  fired: int | None) -> None:
        """Remember the accepted ids by slide; each slide's end is a time the aggregation
        wants the watermark at (to judge lateness)."""
        kept = list(compress(ids, accepted.tolist()))
        if not kept:
            return
        self.seen.update(kept)
        ends = end[accepted]
        slide = self.params.slide_ms
        distinct = np.unique(ends).tolist()
        for at in distinct:
            group = kept if len(distinct) == 1 else list(compress(kept, (ends == at).tolist()))
            self.seen_by_bucket.setdefault(at - slide, []).extend(group)
            if fired is None or at > fired:
                self._schedule.add(at)

    def _pair(self, items: ItemColumns, rows: np.ndarray, cancels: list) -> int:
        """Pair the likes and unlikes at ``rows`` in order; appends ``(post, author, viewer,
        media, like_t, cancel_t)`` per cancelled like; returns how many unlikes found no
        like.

        An unlike cancels the viewer's latest unpaired like at or before it, else it waits;
        a like is cancelled by the earliest waiting unlike at or after it (with no other
        unpaired like of the viewer in between), else it waits for one.
        """
        unmatched = 0
        likes, unlikes = self.likes, self.unlikes
        by_bucket = self.pairs_by_bucket
        slide = self.params.slide_ms
        for kind, t, viewer, author, post, media in zip(
                *(c[rows].tolist() for c in (items.kind, items.t, items.viewer, items.author,
                                             items.post, items.media))):
            key = (post if post >= 0 else -1 - author, viewer)
            if kind == UNLIKE:
                held = likes.get(key)
                earlier = [x for x in held if x <= t] if held else None
                if earlier:
                    like_t = max(earlier)
                    held.remove(like_t)
                    if not held:
                        del likes[key]
                    cancels.append((post, author, viewer, media, like_t, t))
                    continue
                unmatched += 1
                table = unlikes
            else:
                waiting = unlikes.get(key)
                if waiting:
                    later = [x for x in waiting if x >= t]
                    if later:
                        unlike_t = min(later)
                        if not [x for x in likes.get(key, ()) if t < x <= unlike_t]:
                            waiting.remove(unlike_t)
                            if not waiting:
                                del unlikes[key]
                            cancels.append((post, author, viewer, media, t, unlike_t))
                            continue
                table = likes
            held = table.get(key)
            if held is None:
                table[key] = [t]
            else:
                held.append(t)
            b = t - t % slide
            keys = by_bucket.get(b)
            if keys is None:
                by_bucket[b] = [key]
            else:
                keys.append(key)
        return unmatched

    def _affinities(self, items: ItemColumns, accepted: np.ndarray, cancels: list,
                    fired: int | None, out: _Out) -> None:
        p = self.params
        kind, t = items.kind, items.t
        rows = np.flatnonzero(accepted & ((kind <= VIEW) | (kind == PROFILE_VIEW)))
        k = kind[rows]
        w = self._weights[k]
        views = k == VIEW
        w[views] *= np.clip(items.dwell[rows][views], 0, p.dwell_ref_ms) / p.dwell_ref_ms
        media = np.where(k == PROFILE_VIEW, -1, items.media[rows])
        parts = [(items.viewer[rows], items.author[rows], media, t[rows], w)]
        if cancels:
            post, author, viewer, media, like_t, cancel_t = (
                np.array(col, dtype=np.int64) for col in zip(*cancels))
            with_post = post >= 0
            self.posts.cancel(post[with_post], like_t[with_post], cancel_t[with_post], fired, out)
            self.authors.cancel(author, like_t, cancel_t, fired, out)
            # The like's weight as of the unlike, removed then: exact, the sums are linear.
            parts.append((viewer, author, media, cancel_t, -p.weights.get(LIKE, 0.0)
                          * np.exp2(-(cancel_t - like_t) / p.half_life_ms)))
        viewer, author, media, t, w = (np.concatenate(c) for c in zip(*parts))
        nonzero = w != 0.0
        if not nonzero.all():
            viewer, author, media, t, w = (c[nonzero] for c in (viewer, author, media, t, w))
        if not len(t):
            return
        va = self.viewer_authors.rows_of(viewer, author)
        self.viewer_authors.add(va, t, w)
        with_media = media >= 0
        if with_media.any():
            self.viewer_media.add(self.viewer_media.rows_of(viewer[with_media],
                                                            media[with_media]),
                                  t[with_media], w[with_media])
        # A viewer's changed pairs are emitted together at the end of the earliest slide
        # with a change.
        vrows = self.viewer_authors.rows.vrow[va]
        uniq, inverse = np.unique(vrows, return_inverse=True)
        ends = np.full(len(uniq), _NEVER, dtype=np.int64)
        np.minimum.at(ends, inverse, t - t % p.slide_ms + p.slide_ms)
        flush = self.viewers.rows.flush
        sooner = ends < flush[uniq]
        flush[uniq[sooner]] = ends[sooner]
        for at in np.unique(ends[sooner]).tolist():
            self._schedule.add(at)
        expiry = _day_ceiling(int(t.min()) + p.affinity_ttl_ms)
        if self.next_expiry is None or expiry < self.next_expiry:
            self.next_expiry = expiry

    # -- time

    def next_timer(self) -> int | None:
        """When the aggregation next needs the watermark (None: never)."""
        times = [self._schedule.next(), self.next_expiry]
        p = self.params
        if self.seen_by_bucket:
            times.append(min(self.seen_by_bucket) + p.slide_ms + p.dedup_horizon_ms)
        if self.pairs_by_bucket:
            times.append(min(self.pairs_by_bucket) + p.slide_ms + p.post_spec.retention)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def fire(self, until: int) -> FeatureColumns:
        """The watermark passed ``until``: every change point, flush and expiry due by
        then, in time order. Returns the values emitted."""
        out = _Out()
        while True:
            at = self._schedule.pop_until(until)
            if at is None:
                break
            self.posts.fire(at, out)
            self.authors.fire(at, out)
            self._forget(at)
        # An emitted affinity is valid from its pair's latest event, whenever it is sent.
        flushed = [pairs.flush(until, out) for pairs in (self.viewer_authors, self.viewer_media)]
        done = np.unique(np.concatenate(flushed))
        self.viewers.rows.flush[done] = _NEVER
        self.viewers.release_idle(done)
        self._forget(until)
        if self.fired is None or until > self.fired:
            self.fired = until
        return out.columns()

    def _forget(self, at: int) -> None:
        """Drop dedup ids, unpaired likes and affinities past their horizons at ``at``."""
        p = self.params
        cutoff = at - p.dedup_horizon_ms
        cutoff -= cutoff % p.slide_ms
        for b in [b for b in self.seen_by_bucket if b < cutoff]:
            self.seen.difference_update(self.seen_by_bucket.pop(b))
        pair_cutoff = at - p.post_spec.retention
        for b in [b for b in self.pairs_by_bucket if b + p.slide_ms <= pair_cutoff]:
            for key in set(self.pairs_by_bucket.pop(b)):
                for table in (self.likes, self.unlikes):
                    times = table.get(key)
                    if times is not None:
                        kept = [t for t in times if t >= pair_cutoff]
                        if kept:
                            table[key] = kept
                        else:
                            del table[key]
        if self.next_expiry is not None and at >= self.next_expiry:
            cutoff = at - p.affinity_ttl_ms
            oldest = [t for t in (self.viewer_authors.expire(cutoff),
                                  self.viewer_media.expire(cutoff)) if t is not None]
            self.next_expiry = (_day_ceiling(min(oldest) + p.affinity_ttl_ms)
                                if oldest else None)

    # -- state as columns

    def export(self) -> dict[str, dict[str, np.ndarray]]:
        """The whole state as tables of NumPy columns (``restore`` takes them back)."""
        seen_ids = [i for ids in self.seen_by_bucket.values() for i in ids]
        seen_buckets = [b for b, ids in self.seen_by_bucket.items() for _ in ids]
        held = [(key, t, False) for key, ts in self.likes.items() for t in ts] + \
               [(key, t, True) for key, ts in self.unlikes.items() for t in ts]
        tables = {
            "scalars": {"fired": np.array([_NONE if self.fired is None else self.fired]),
                        "next_expiry": np.array([_NONE if self.next_expiry is None
                                                 else self.next_expiry])},
            "schedule": {"at": self._schedule.export()},
            "seen": {"id": np.array(seen_ids, dtype=object),
                     "bucket": np.array(seen_buckets, dtype=np.int64)},
            "held": {"key": np.array([k[0] for k, _, _ in held], np.int64),
                     "viewer": np.array([k[1] for k, _, _ in held], np.int64),
                     "t": np.array([t for _, t, _ in held], np.int64),
                     "unlike": np.array([u for _, _, u in held], np.bool_)},
            "viewers": self.viewers.rows.export(),
            "viewer_author": self.viewer_authors.export(),
            "viewer_media": self.viewer_media.export(),
        }
        for name, windows in (("post", self.posts), ("author", self.authors)):
            for part, table in windows.export().items():
                tables[f"{name}_{part}"] = table
        return tables

    @classmethod
    def restore(cls, params: FeatureParams,
                tables: dict[str, dict[str, np.ndarray]]) -> "FeatureAggregator":
        agg = cls(params)
        scalars = tables["scalars"]
        fired, expiry = int(scalars["fired"][0]), int(scalars["next_expiry"][0])
        agg.fired = None if fired == _NONE else fired
        agg.next_expiry = None if expiry == _NONE else expiry
        for name, windows in (("post", agg.posts), ("author", agg.authors)):
            windows.restore({k: tables[f"{name}_{k}"] for k in ("entities", "cells", "agenda")})
        agg._schedule.restore(tables["schedule"]["at"])
        seen = tables["seen"]
        for eid, b in zip(list(seen["id"]), np.asarray(seen["bucket"]).tolist()):
            agg.seen.add(eid)
            agg.seen_by_bucket.setdefault(b, []).append(eid)
        held = tables["held"]
        slide = params.slide_ms
        for key, viewer, t, unlike in zip(*(np.asarray(held[k]).tolist()
                                            for k in ("key", "viewer", "t", "unlike"))):
            (agg.unlikes if unlike else agg.likes).setdefault((key, viewer), []).append(t)
            agg.pairs_by_bucket.setdefault(t - t % slide, []).append((key, viewer))
        agg.viewers.restore(tables["viewers"])
        agg.viewer_authors.restore(tables["viewer_author"])
        agg.viewer_media.restore(tables["viewer_media"])
        return agg

    def sizes(self) -> dict[str, int]:
        """How much the state holds, by kind."""
        return {"posts": len(self.posts), "authors": len(self.authors),
                "post_cells": len(self.posts.cells), "author_cells": len(self.authors.cells),
                "viewers": len(self.viewers.index),
                "viewer_author_pairs": len(self.viewer_authors),
                "viewer_media_pairs": len(self.viewer_media), "event_ids": len(self.seen)}


def _day_ceiling(t: int) -> int:
    return t - t % DAY_MS + DAY_MS


# -- which source records the state holds ---------------------------------------------------


class AppliedOffsets:
    """The source offsets whose events the state holds, per ``(topic, partition)``, as
    sorted, merged ``[first, last]`` ranges.

    A restart re-reads each partition from ``restart()``, the first offset after
    its first range, and skips what ``covered`` says the state already holds.
    A gap between ranges is an offset not seen: a record still on its way, or
    one the source's decode step dead-lettered (it never reaches the
    aggregation). ``settle()`` (called once per snapshot) fills the gaps that
    were already there at the previous call: records travel through the runner
    in order per partition, so a gap that outlived a whole snapshot interval is
    a dead-lettered record, and keeping it would make every restart re-read
    from it.
    """

    def __init__(self, ranges: dict[tuple[str, int], list[list[int]]] | None = None):
        self.ranges: dict[tuple[str, int], list[list[int]]] = ranges or {}
        self._old_gaps: set[tuple[str, int, int]] = set()

    def add(self, topic: str, partition: int, first: int, last: int) -> None:
        ranges = self.ranges.setdefault((topic, partition), [])
        if ranges and ranges[-1][1] + 1 >= first and ranges[-1][0] <= first:
            ranges[-1][1] = max(ranges[-1][1], last)  # the usual case: the next batch
            return
        ranges.append([first, last])
        ranges.sort()
        merged = [ranges[0]]
        for lo, hi in ranges[1:]:
            if lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        ranges[:] = merged

    def covered(self, topic: str, partition: int, offsets: np.ndarray) -> np.ndarray:
        """Which of ``offsets`` (of one partition) the state already holds."""
        mask = np.zeros(len(offsets), dtype=bool)
        for lo, hi in self.ranges.get((topic, partition), ()):
            mask |= (offsets >= lo) & (offsets <= hi)
        return mask

    def restart(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset a restart reads from."""
        return {tp: ranges[0][1] + 1 for tp, ranges in self.ranges.items() if ranges}

    def settle(self) -> list[tuple[str, int, int, int]]:
        """Fill the gaps that were there at the previous call (see the class doc); returns
        them as ``(topic, partition, first, last)``."""
        gaps = set()
        filled = []
        for (topic, partition), ranges in self.ranges.items():
            merged = [ranges[0]]
            for lo, hi in ranges[1:]:
                gap = (topic, partition, merged[-1][1] + 1)
                if gap in self._old_gaps:
                    filled.append((topic, partition, merged[-1][1] + 1, lo - 1))
                    merged[-1][1] = hi
                else:
                    gaps.add(gap)
                    merged.append([lo, hi])
            ranges[:] = merged
        self._old_gaps = gaps
        return filled

    def to_json(self) -> list:
        """The ranges as JSON-ready lists: a copy (a snapshot serializes it on another
        thread while ``add`` goes on extending the live ranges in place)."""
        return [[topic, partition, [[lo, hi] for lo, hi in ranges]]
                for (topic, partition), ranges in sorted(self.ranges.items())]

    @classmethod
    def from_json(cls, data: list) -> "AppliedOffsets":
        return cls({(topic, int(partition)): [[int(lo), int(hi)] for lo, hi in ranges]
                    for topic, partition, ranges in data})


__all__ = ["ItemColumns", "Applied", "COUNTS", "FeatureAggregator", "AppliedOffsets",
           "post_values", "author_values"]
