"""serving.logic and serving.auth without servers: merging, paging across ties,
cursors, the circuit breaker, rebuild decisions, tokens and request edges."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jwt

from serving.app import _body_refusal
from serving.auth import AuthError, TokenAuth, issue_token, parse_user_id
from serving.feeds import FailureLog, newer_than
from serving.feeds import reason as failure_reason
from serving.logic import (
    ChronoCursor,
    CircuitBreaker,
    CursorCodec,
    CursorError,
    DeletionFollower,
    FlatSource,
    Position,
    RankedCursor,
    SourceBatch,
    TrayCursor,
    fresh_entries,
    merge_flat,
    merge_page,
    needs_rebuild,
    rebuild_entries,
    stream_id,
)

KEY = "unit-test-key-0123456789-0123456789"


def fetch(source: list[tuple[int, int]], after: Position | None, n: int) -> SourceBatch:
    """What a store returns: entries with score <= after's ms, newest first, at most n;
    ties in an order unrelated to post id (as Redis orders members as strings)."""
    ordered = sorted(source, key=lambda e: (-e[1], str(e[0])), reverse=False)
    got = [e for e in ordered if after is None or e[1] <= after.created_at][:n]
    return SourceBatch(got, len(got) >= n)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(1, 60), st.integers(0, 8), max_size=40),
       st.lists(st.lists(st.integers(1, 60), max_size=25), min_size=1, max_size=3),
       st.integers(1, 6), st.integers(0, 4))
def test_paging_visits_every_entry_once_in_order(created, picks, limit, slack):
    # A post has one creation time; sources (home feed, timelines) overlap freely.
    sources = [[(pid, created[pid]) for pid in dict.fromkeys(p) if pid in created] for p in picks]
    best: dict[int, int] = {}
    for s in sources:
        for pid, ms in s:
            best[pid] = max(best.get(pid, -1), ms)
    expected = [pid for ms, pid in sorted(((ms, pid) for pid, ms in best.items()), reverse=True)]
    seen, after = [], None
    for _ in range(500):
        n = limit + slack
        page = merge_page([fetch(s, after, n) for s in sources], after, limit)
        growth = 1
        while not page.entries and page.short:  # as FeedService grows its reads
            growth *= 4
            page = merge_page([fetch(s, after, n * growth) for s in sources], after, limit)
        assert len(page.entries) <= limit
        seen += [pid for pid, _ in page.entries]
        if page.next_position is None:
            break
        after = page.next_position
    assert seen == expected


def whole_merge(batches: list[SourceBatch], after: Position | None, limit: int):
    """The page by the definition: every entry parsed, deduplicated (newest kept),
    those after the cursor and above every full source's boundary, sorted."""
    floors = [b.entries[-1][1] for b in batches if b.full and b.entries]
    floor = max(floors) if floors else None
    best: dict[int, int] = {}
    for b in batches:
        for pid, ms in b.entries:
            if after is None or (ms, pid) < (after.created_at, after.post_id):
                best[pid] = max(best.get(pid, -1), ms)
    trusted = [e for e in sorted(((ms, pid) for pid, ms in best.items()), reverse=True)
               if floor is None or e[0] > floor]
    page = trusted[:limit]
    more = floor is not None or len(trusted) > limit
    nxt = (Position(*page[-1]) if page else after) if more else None
    return [(pid, ms) for ms, pid in page], nxt, floor is not None and len(page) < limit


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 6)), max_size=20),
                          st.booleans()), min_size=1, max_size=6),
       st.one_of(st.none(), st.tuples(st.integers(0, 7), st.integers(0, 31))),
       st.integers(1, 8))
def test_the_lazy_merge_reads_the_page_the_whole_merge_defines(raw, cut, limit):
    # Sources newest first, ties in string order of the id (as Redis keeps them);
    # a post may carry different times in different sources; replies as bytes.
    batches = [SourceBatch(sorted(dict(entries).items(), key=lambda e: (-e[1], str(e[0]))), full)
               for entries, full in raw]
    after = None if cut is None else Position(*cut)
    flat = [FlatSource([str(x).encode() for e in b.entries for x in e], b.full) for b in batches]
    assert tuple(merge_flat(flat, after, limit)) == whole_merge(batches, after, limit)


def test_merge_dedupes_and_stops_at_a_full_sources_boundary():
    home = SourceBatch([(5, 50), (4, 40), (3, 30)], full=True)
    celeb = SourceBatch([(9, 45), (5, 50), (1, 10)], full=False)
    page = merge_page([home, celeb], None, 10)
    assert page.entries == [(5, 50), (9, 45), (4, 40)]   # 3@30 and 1@10 not trusted yet
    assert page.next_position == Position(40, 4)
    done = merge_page([SourceBatch([(2, 20)], False)], Position(40, 4), 10)
    assert done == ([(2, 20)], None, False)


def test_fresh_entries_and_rebuild_entries():
    batches = [SourceBatch([(7, 70), (6, 60), (5, 50)], True), SourceBatch([(8, 80), (7, 70)], False)]
    assert fresh_entries(batches, 55, exclude=[8], limit=5) == [(7, 70), (6, 60)]
    assert rebuild_entries([[(1, 10), (2, 20)], [(2, 20), (3, 5)]], cap=2) == [(2, 20), (1, 10)]


def test_rebuild_decision():
    day = 86_400_000
    assert needs_rebuild(None, 0, 100 * day, 30 * day)            # cold: nothing in Redis
    assert not needs_rebuild(None, 4, 100 * day, 30 * day)        # never read, has a feed
    assert needs_rebuild(60 * day, 4, 100 * day, 30 * day)        # inactive for 40 days
    assert not needs_rebuild(80 * day, 4, 100 * day, 30 * day)


def test_cursors_round_trip_and_refuse_tampering():
    codec = CursorCodec(KEY.encode())
    for cursor in (ChronoCursor(7, Position(1_700_000_000_123, 2 ** 62)), RankedCursor(7, 99, 40)):
        assert codec.decode(codec.encode(cursor)) == cursor
    token = codec.encode(ChronoCursor(7, Position(1, 2)))
    forged = CursorCodec(b"another key").encode(ChronoCursor(8, Position(1, 2)))
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (forged, flipped, "", "!!!", "x" * 300, token[:5]):
        with pytest.raises(CursorError):
            codec.decode(bad)


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 1.5
    assert breaker.allow() and breaker.state == "half-open"
    assert not breaker.allow()                    # one probe at a time
    breaker.failure()                              # probe failed: open again
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 3.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_tokens():
    now = [1_000_000.0]
    auth = TokenAuth(KEY, clock=lambda: now[0])
    good = issue_token(KEY, 42, ttl_s=60)
    assert auth.user_id(f"Bearer {good}") == 42
    assert auth.user_id(f"bearer {good}") == 42    # cached path
    for header, reason in ((None, "missing"), ("Basic abc", "malformed"), ("Bearer ", "malformed"),
                           (f"Bearer {issue_token('x' * 40, 42)}", "invalid"),
                           (f"Bearer {issue_token(KEY, 42, now_s=1)}", "expired")):
        with pytest.raises(AuthError, match=reason):
            auth.user_id(header)
    now[0] += 10 ** 10                              # the cached token expires too
    with pytest.raises(AuthError, match="expired"):
        auth.user_id(f"Bearer {good}")
    with pytest.raises(ValueError):
        TokenAuth("short")


def test_post_meta_fast_path_agrees_with_parse_post():
    from stores.redis.feeds import POST_FIELDS, FeedCommands, parse_post, post_fields
    from schemas.events import MediaType, PostEvent, PostEventKind

    post = PostEvent("e", 5, PostEventKind.CREATED, 9, 3, 1000, MediaType.REEL, 12, ("a", "b"))
    stored = {k.encode(): v.encode() for k, v in post_fields(post).items()}
    reply = [stored.get(f.encode()) for f in POST_FIELDS]
    assert FeedCommands.post_meta(9, reply) == parse_post(9, stored)
    tombstone = [b"3", b"1000", None, None, None, b"1"]
    assert FeedCommands.post_meta(9, tombstone) is None
    assert FeedCommands.post_meta(9, [None] * len(POST_FIELDS)) is None


def test_subjects_must_be_ascii_decimal_ids():
    auth = TokenAuth(KEY)

    def token(sub) -> str:
        return "Bearer " + jwt.encode({"sub": sub, "exp": 4_000_000_000}, KEY, algorithm="HS256")

    assert auth.user_id(token("12")) == 12
    assert auth.user_id(token(str(2 ** 63 - 1))) == 2 ** 63 - 1
    # "²" passes str.isdigit but int() refuses it; "١٢" is 12 to int(): both were
    # accepted as ids once (a 500, and user 12's feed).
    for sub in ("\u00b2", "\u0661\u0662", "\uff11", "-1", "+1", " 1", "1.0", "",
                str(2 ** 63), "1" * 20):
        with pytest.raises(AuthError, match="'sub' must be a user id"):
            auth.user_id(token(sub))
    assert [parse_user_id(t) for t in ("0", "007", "\u0661", "1e3", None, 7)] == [
        0, 7, None, None, None, None]


def test_tray_cursors_are_their_own_kind():
    codec = CursorCodec(KEY.encode())
    cursor = TrayCursor(7, 200)
    assert codec.decode(codec.encode(cursor)) == cursor
    assert not isinstance(codec.decode(codec.encode(RankedCursor(7, 5, 200))), TrayCursor)


def test_request_bodies_are_refused_past_the_limit():
    assert _body_refusal([(b"content-length", b"0")], 1024) is None
    assert _body_refusal([(b"content-length", b"1024"), (b"host", b"x")], 1024) is None
    for headers in ([(b"content-length", b"1025")], [(b"content-length", b"-1")],
                    [(b"content-length", b"1e9")], [(b"transfer-encoding", b"chunked")]):
        refusal = _body_refusal(headers, 1024)
        assert refusal is not None and refusal.status == 413, headers


def test_store_failures_show_clients_a_reason_and_log_the_rest(caplog):
    from stores.cassandra.aio import CassandraUnavailable
    from stores.redis.aio import RedisUnavailable

    lost = RedisUnavailable("cannot connect to Redis at 10.1.2.3:6379: Errno 111", "unreachable")
    assert failure_reason(lost) == "unreachable" and "10.1.2.3" not in failure_reason(lost)
    assert failure_reason(CassandraUnavailable("NoHostAvailable: {'10.1.2.3:9042': ...}")) == "failed"
    failures = FailureLog(every_s=60)
    with caplog.at_level("WARNING", logger="serving.feeds"):
        for _ in range(3):
            failures("redis", lost)
    assert len(caplog.records) == 1 and "10.1.2.3" in caplog.records[0].getMessage()
    assert failures.suppressed == {"redis": 2}


def test_newer_than_keeps_the_head_above_the_ranking():
    flat = [b"9", b"300", b"8", b"200", b"7", b"200", b"6", b"1.5e2"]
    assert newer_than(flat, 250) == [b"9", b"300"]
    assert newer_than(flat, 199) == flat[:6]
    assert newer_than(flat, 100) == flat and newer_than(flat, 300) == [] == newer_than([], 0)


# -- the log of deleted posts ------------------------------------------------------------


def test_deletion_reads_are_due_once_per_poll_and_never_when_off():
    follower = DeletionFollower(poll_s=0.25, grace_s=1.0)
    assert follower.due(10.0) and not follower.due(10.2) and follower.due(10.25)
    assert not any(DeletionFollower(0.0, 1.0).due(t) for t in (0.0, 5.0, 1e6))


def test_a_follower_is_current_only_within_a_poll_and_the_grace_of_its_last_answer():
    follower = DeletionFollower(poll_s=0.25, grace_s=1.0)
    assert not follower.current(0.0)  # never read
    follower.start([b"1700-3"], sent_at=10.0)
    assert follower.last_id == b"1700-3"
    assert follower.current(11.24) and not follower.current(11.25)
    assert follower.advance([b"1800-0"], [b"1000-0"], sent_at=11.0) is False
    assert follower.last_id == b"1800-0" and follower.current(12.2)
    follower.reset()
    assert follower.last_id is None and not follower.current(12.2) and follower.due(12.2)


def test_an_empty_log_is_followed_from_its_first_entry_without_a_clear():
    follower = DeletionFollower(poll_s=0.25, grace_s=1.0)
    follower.start([], sent_at=0.0)
    assert follower.last_id == DeletionFollower.EMPTY
    # The first entry ever is newer than "0-0": no entries were missed.
    assert follower.advance([b"5-0"], [b"5-0"], sent_at=0.3) is False
    assert follower.last_id == b"5-0"


def test_a_log_trimmed_past_the_followers_place_says_clear():
    follower = DeletionFollower(poll_s=0.25, grace_s=1.0)
    follower.start([b"100-0"], sent_at=0.0)
    assert follower.advance([b"900-0", b"901-0"], [b"900-0"], sent_at=0.3) is True
    assert follower.last_id == b"901-0"
    # Still holding its place: no clear, whatever the oldest entry's sequence.
    assert follower.advance([], [b"901-0"], sent_at=0.6) is False
    assert stream_id(b"10-2") > stream_id(b"9-9") and stream_id(b"10-10") > stream_id(b"10-9")


def test_a_full_read_reads_on_at_once_and_is_not_yet_current():
    follower = DeletionFollower(poll_s=0.25, grace_s=1.0, batch=2)
    follower.start([b"1-0"], sent_at=0.0)
    assert follower.due(0.1)
    follower.advance([b"2-0", b"3-0"], [b"1-0"], sent_at=5.0)  # as many as asked: more may wait
    assert not follower.current(5.0) and follower.due(5.0)
    follower.advance([b"4-0"], [b"1-0"], sent_at=5.1)
    assert follower.current(5.1) and not follower.due(5.2)


def test_deletion_replies_parse_to_entry_and_post_ids():
    from schemas.keys import KeyLayout
    from stores.redis.feeds import FeedCommands

    reply = [[b"7-0", [b"posts", b"11,12"]], [b"7-1", [b"posts", b"13"]], [b"8-0", [b"other", b"1"]]]
    assert FeedCommands.deletions(reply) == ([b"7-0", b"7-1", b"8-0"], [11, 12, 13])
    assert FeedCommands.deletions([]) == ([], [])
    commands = FeedCommands(KeyLayout("fb")).deletions_after(b"7-1", 50)
    assert commands[0] == ("XRANGE", "fb:meta:deleted_posts", b"(7-1", "+", "COUNT", 50)
