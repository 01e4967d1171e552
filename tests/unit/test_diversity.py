"""Diversity re-ranking (``ranking_logic.diversify``) as properties over random inputs.

The checker below states the rules from the output alone, independently of
how ``diversify`` finds it: the first entry is the best; each position holds
the best remaining entry that keeps both rules, when there is one; a rule is
broken only when no remaining entry could keep it.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.ranking import diversify


class Entry(NamedTuple):
    post_id: int
    author_id: int
    score: float


@st.composite
def entry_lists(draw, max_authors=8, max_size=60):
    authors = draw(st.integers(1, max_authors))
    size = draw(st.integers(0, max_size))
    # Few distinct scores: ties are common, which is where order bugs hide.
    scores = st.one_of(st.integers(0, 20).map(float), st.floats(0, 1, allow_nan=False))
    return [Entry(i, draw(st.integers(0, authors - 1)), draw(scores)) for i in range(size)]


rules = st.tuples(st.integers(0, 25), st.integers(1, 4), st.booleans())


def _allowed(entry, prev, in_top, position, top_k, cap, no_adjacent):
    return ((not no_adjacent or prev is None or entry.author_id != prev.author_id)
            and (position >= top_k or in_top[entry.author_id] < cap))


def check(entries, out, top_k, cap, no_adjacent):
    assert sorted(out) == sorted(entries)  # a permutation: nothing lost, nothing doubled
    in_top: Counter = Counter()
    for i, e in enumerate(out):
        prev = out[i - 1] if i else None
        rest = out[i:]
        ok = [r for r in rest if _allowed(r, prev, in_top, i, top_k, cap, no_adjacent)]
        if ok:
            assert _allowed(e, prev, in_top, i, top_k, cap, no_adjacent), (i, e)
            assert e.score == max(r.score for r in ok), (i, e)
        else:
            # A rule gave way: the cap before adjacency.
            not_adjacent = [r for r in rest if not no_adjacent or prev is None
                            or r.author_id != prev.author_id]
            if not_adjacent:
                assert e in not_adjacent and e.score == max(r.score for r in not_adjacent)
            else:
                assert e.score == max(r.score for r in rest)
        if i < top_k:
            in_top[e.author_id] += 1


@settings(max_examples=400, deadline=None)
@given(entry_lists(), rules)
def test_each_position_is_the_best_entry_the_rules_allow(entries, rule):
    top_k, cap, no_adjacent = rule
    check(entries, diversify(entries, top_k, cap, no_adjacent), top_k, cap, no_adjacent)


@settings(max_examples=300, deadline=None)
@given(entry_lists(), rules)
def test_first_is_best_and_each_author_keeps_score_order(entries, rule):
    out = diversify(entries, *rule)
    if entries:
        assert out[0].score == max(e.score for e in entries)
    for author in {e.author_id for e in entries}:
        mine = [e for e in out if e.author_id == author]
        assert [e.score for e in mine] == sorted((e.score for e in mine), reverse=True)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 25), st.integers(1, 4))
def test_rules_hold_in_the_top_k_when_enough_authors(data, top_k, cap):
    # More than ceil(top_k / cap) authors with at least cap entries each:
    # the greedy order can always keep both rules in the top k.
    authors = math.ceil(top_k / cap) + 1 + data.draw(st.integers(0, 3))
    entries, post_id = [], 0
    for author in range(authors):
        for _ in range(cap + data.draw(st.integers(0, 4))):
            entries.append(Entry(post_id, author, data.draw(st.floats(0, 1, allow_nan=False))))
            post_id += 1
    entries = data.draw(st.permutations(entries))
    top = diversify(entries, top_k, cap, True)[:top_k]
    assert max(Counter(e.author_id for e in top).values()) <= cap
    assert all(a.author_id != b.author_id for a, b in zip(top, top[1:]))


@given(st.lists(st.floats(0, 1, allow_nan=False), max_size=40))
def test_distinct_authors_keep_the_score_order(scores):
    entries = [Entry(i, i, s) for i, s in enumerate(scores)]
    out = diversify(entries)
    assert [e.score for e in out] == sorted(scores, reverse=True)


def test_examples():
    a = [Entry(1, 7, 0.9), Entry(2, 7, 0.8), Entry(3, 7, 0.7), Entry(4, 7, 0.6),
         Entry(5, 8, 0.5), Entry(6, 8, 0.4), Entry(7, 9, 0.1)]
    # Alternation pulls 8's and 9's posts up between 7's; the 4th post of 7
    # would exceed the cap of 3 within the top 5, so it goes last.
    out = diversify(a, top_k=5, max_per_author=3)
    assert [e.post_id for e in out] == [1, 5, 2, 6, 3, 7, 4]
    # One author only: nothing to interleave, score order stays.
    solo = [Entry(i, 1, 1.0 - i / 10) for i in range(5)]
    assert diversify(solo) == solo
    # Ties keep the input order.
    tied = [Entry(1, 1, 0.5), Entry(2, 2, 0.5), Entry(3, 3, 0.5)]
    assert diversify(tied) == tied
    assert diversify([]) == []


def test_rejects_bad_rules():
    with pytest.raises(ValueError):
        diversify([], top_k=-1)
    with pytest.raises(ValueError):
        diversify([], max_per_author=0)
