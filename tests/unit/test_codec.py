"""The Confluent wire codec: round trips, every malformed case, evolution, registry."""
from __future__ import annotations

import copy
import io
import json
import pickle
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fastavro
import pytest
from hypothesis import given, settings, strategies as st

from schemas import codec as wire
from schemas.codec import (
    BadBodyError, MalformedRecordError, RegistrySchemaSource, SchemaRegistry,
    SchemaRegistryError, SchemaTopicMismatchError, StaticSchemaSource, TooShortError,
    TruncatedRecordError, UnknownSchemaIdError, WireCodec, WrongMagicError,
)
from schemas.events import (
    EngagementEvent, EngagementKind, FollowEvent, FollowKind, MediaType, PostEvent,
    PostEventKind, StoryEvent, StoryEventKind,
)

T0 = 1_700_000_000_000

EVENTS = [
    PostEvent("p1", T0, PostEventKind.CREATED, post_id=10, author_id=7, created_at=T0,
              media_type=MediaType.REEL, caption_length=42, hashtags=("sun", "sea")),
    PostEvent("p2", T0 + 5, PostEventKind.DELETED, post_id=10, author_id=7, created_at=T0),
    EngagementEvent("e1", T0, EngagementKind.VIEW, viewer_id=3, author_id=7, post_id=10,
                    media_type=MediaType.VIDEO, dwell_ms=1500),
    EngagementEvent("e2", T0, EngagementKind.PROFILE_VIEW, viewer_id=3, author_id=7),
    StoryEvent("s1", T0, StoryEventKind.PUBLISHED, story_id=99, author_id=7, created_at=T0,
               expires_at=T0 + 3600_000, media_type=MediaType.PHOTO),
    StoryEvent("s2", T0, StoryEventKind.VIEWED, story_id=99, author_id=7, viewer_id=3),
    FollowEvent("f1", T0, FollowKind.FOLLOW, follower_id=3, followee_id=7),
    FollowEvent("f2", T0 + 1, FollowKind.UNFOLLOW, follower_id=3, followee_id=2**62),
]


@pytest.fixture(scope="module")
def codec() -> WireCodec:
    return WireCodec()


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event_id)
def test_round_trip_every_event_type(codec, event):
    data = codec.encode(event)
    assert data[0] == 0
    assert codec.decode(data) == event
    assert codec.decode(data, expected_type=type(event)) == event


def test_static_schema_ids_are_in_the_header(codec):
    expected = {PostEvent: 1, EngagementEvent: 2, StoryEvent: 3, FollowEvent: 4}
    by_type = {type(e): e for e in EVENTS}
    for record_type, sid in expected.items():
        assert codec.encode(by_type[record_type])[:5] == b"\x00" + sid.to_bytes(4, "big")
        assert codec.schema_id_of(record_type) == sid


@settings(max_examples=100, deadline=None)
@given(
    event_id=st.text(max_size=40),
    event_time=st.integers(0, 2**62),
    ids=st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)),
    dwell=st.none() | st.integers(-2**31, 2**31 - 1),
    post_id=st.none() | st.integers(0, 2**63 - 1),
    kind=st.sampled_from(EngagementKind),
    media=st.none() | st.sampled_from(MediaType),
)
def test_round_trip_any_engagement(event_id, event_time, ids, dwell, post_id, kind, media):
    event = EngagementEvent(event_id, event_time, kind, ids[0], ids[1], post_id, media, dwell)
    codec = WireCodec()
    assert codec.decode(codec.encode(event)) == event


def test_codec_pickles_without_caches(codec):
    codec.decode(codec.encode(EVENTS[0]))
    clone = pickle.loads(pickle.dumps(codec))
    assert clone._decoders == {}
    assert clone.decode(codec.encode(EVENTS[2])) == EVENTS[2]


# --------------------------------------------------------------------------- malformed


def _reason(codec, data, **kwargs) -> str:
    with pytest.raises(MalformedRecordError) as info:
        codec.decode(data, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value.reason


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00\x00"])
def test_too_short(codec, data):
    with pytest.raises(TooShortError):
        codec.decode(data)
    assert _reason(codec, data) == "too_short"


def test_wrong_magic(codec):
    data = bytearray(codec.encode(EVENTS[0]))
    data[0] = 1
    with pytest.raises(WrongMagicError):
        codec.decode(bytes(data))
    assert _reason(codec, b'{"json": "not avro"}') == "wrong_magic"


def test_unknown_schema_id(codec):
    with pytest.raises(UnknownSchemaIdError) as info:
        codec.decode(wire.header(12345) + b"\x02")
    assert info.value.reason == "unknown_schema_id"
    assert info.value.schema_id == 12345


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event_id)
def test_every_truncation_is_rejected(codec, event):
    data = codec.encode(event)
    for cut in range(5, len(data)):
        with pytest.raises(MalformedRecordError) as info:
            codec.decode(data[:cut])
        assert info.value.reason in ("truncated", "bad_body"), cut
    with pytest.raises(TruncatedRecordError):
        codec.decode(data[:5])


def test_trailing_garbage(codec):
    with pytest.raises(BadBodyError) as info:
        codec.decode(codec.encode(EVENTS[0]) + b"\x00")
    assert info.value.reason == "bad_body"
    assert "trailing" in str(info.value)


def test_bad_body(codec):
    # PostEvent: event_id "" then event_time 0 then enum index 9 (no such symbol).
    with pytest.raises(BadBodyError):
        codec.decode(wire.header(1) + b"\x00\x00\x12" + b"\x00" * 20)
    # A string length of -1.
    assert _reason(codec, wire.header(4) + b"\x01" + b"\x00" * 10) in ("bad_body", "truncated")


def test_invalid_utf8_is_bad_body(codec):
    assert _reason(codec, wire.header(4) + b"\x02\xff" + b"\x00" * 10) == "bad_body"


def test_schema_topic_mismatch(codec):
    data = codec.encode(EVENTS[0])
    with pytest.raises(SchemaTopicMismatchError) as info:
        codec.decode(data, expected_type=FollowEvent)
    assert info.value.reason == "schema_topic_mismatch"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64), sid=st.sampled_from([1, 2, 3, 4, 77]))
def test_random_bytes_never_escape_as_other_errors(body, sid):
    codec = WireCodec()
    try:
        event = codec.decode(wire.header(sid) + body)
    except MalformedRecordError:
        return
    assert codec.decode(codec.encode(event)) == event


# --------------------------------------------------------------------------- evolution


def _post_schema_v1() -> dict:
    return copy.deepcopy(wire.reader_schema(PostEvent))


def _post_schema_v2() -> dict:
    schema = _post_schema_v1()
    schema["fields"].append(
        {"name": "location_id", "type": ["null", "long"], "default": None})
    schema["fields"].append({"name": "language", "type": "string", "default": "und"})
    return schema


def test_new_reader_reads_old_records():
    old = WireCodec()
    new = WireCodec(reader_schemas={PostEvent: _post_schema_v2()})
    data = old.encode(EVENTS[0])
    record_type, record = new.decode_dict(data)
    assert record_type is PostEvent
    assert record["location_id"] is None and record["language"] == "und"
    assert new.decode(data) == EVENTS[0]


def test_old_reader_reads_new_records():
    v2 = _post_schema_v2()
    # id 1 = v1, id 5 = v2, as a registry would have them after the upgrade.
    source = StaticSchemaSource({1: _post_schema_v1(), 5: v2})
    buf = io.BytesIO()
    buf.write(wire.header(5))
    fastavro.schemaless_writer(
        buf, fastavro.parse_schema(v2), {**EVENTS[0].to_avro(), "location_id": 5, "language": "fr"})
    codec = WireCodec(source)
    assert codec.decode(buf.getvalue()) == EVENTS[0]
    assert codec.decode_dict(buf.getvalue())[1].keys() == EVENTS[0].to_avro().keys()


def test_incompatible_writer_schema_is_bad_body():
    broken = _post_schema_v1()
    broken["fields"][3]["type"] = "string"  # post_id long -> string: not resolvable
    codec = WireCodec(StaticSchemaSource({9: broken}))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(broken), {**EVENTS[0].to_avro(), "post_id": "x"})
    with pytest.raises(BadBodyError):
        codec.decode(wire.header(9) + buf.getvalue())


# --------------------------------------------------------------------------- registry


class _FakeRegistry(BaseHTTPRequestHandler):
    """The Schema Registry REST endpoints the client calls (shared state on the server).

    ``POST /subjects/<subject>/versions`` registers, ``GET /schemas/ids/<id>``
    fetches; anything else is a plain 404, as from a server that is no registry.
    ``server.fail_next`` answers that many requests with a 503 first.
    """

    def _send(self, code: int, body: dict | None) -> None:
        raw = b"no such page" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json"
                         if body is not None else "text/plain")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _route(self, method: str) -> list[str] | None:
        url = urllib.parse.urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append((method, url.path))
            if self.server.fail_next:
                self.server.fail_next -= 1
                self._send(503, {"error_code": 50301, "message": "try again"})
                return None
        return [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]

    def do_POST(self):
        parts = self._route("POST")
        if parts is None:
            return
        if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
            return self._send(404, None)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        canonical = json.dumps(json.loads(body["schema"]), sort_keys=True)
        server = self.server
        with server.lock:
            sid = server.ids.setdefault(canonical, len(server.ids) + 100)
            server.schemas[sid] = {"schema": body["schema"]}
            server.subjects.setdefault(parts[1], set()).add(sid)
        self._send(200, {"id": sid})

    def do_GET(self):
        parts = self._route("GET")
        if parts is None:
            return
        if len(parts) != 3 or parts[:2] != ["schemas", "ids"]:
            return self._send(404, None)
        answer = self.server.schemas.get(int(parts[2]))
        if answer is None:
            self._send(404, {"error_code": 40403, "message": "Schema not found"})
        else:
            self._send(200, answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def registry_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    server.lock = threading.Lock()
    server.requests, server.ids, server.schemas, server.subjects = [], {}, {}, {}
    server.fail_next = 0
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_registry_codec_round_trip_and_caching(registry_url):
    server, url = registry_url
    writer = WireCodec(registry_url=url)
    data = [writer.encode(e, topic="demo." + e.TOPIC) for e in EVENTS]
    assert set(server.subjects) == {f"demo.{t}-value" for t in
                                    ("post-events", "engagement-events", "story-events", "follow-events")}
    # One registration per (type, topic), then cached; the writer never fetches what it registered.
    assert [m for m, _ in server.requests] == ["POST"] * 4
    assert writer.schema_id_of(PostEvent, "demo.post-events") == int.from_bytes(data[0][1:5], "big")
    assert {int.from_bytes(d[1:5], "big") for d in data} == set(server.schemas)

    reader = WireCodec(registry_url=url)  # a fresh process: fetches each id once
    for _ in range(2):
        assert [reader.decode(d) for d in data] == EVENTS
    gets = [p for m, p in server.requests if m == "GET"]
    assert sorted(gets) == sorted(f"/schemas/ids/{i}" for i in server.schemas)

    with pytest.raises(UnknownSchemaIdError) as info:
        reader.decode(wire.header(4242) + b"\x00")
    assert info.value.reason == "unknown_schema_id" and info.value.schema_id == 4242


def test_registry_client_register_is_cached(registry_url):
    server, url = registry_url
    registry = SchemaRegistry(url)
    schema = wire.reader_schema(FollowEvent)
    sid = registry.register("x-value", schema)
    assert registry.register("x-value", schema) == sid
    assert registry.schema_by_id(sid) == schema
    assert server.requests == [("POST", "/subjects/x-value/versions")]
    assert SchemaRegistry(url).schema_by_id(sid) == schema  # another client asks the registry
    clone = pickle.loads(pickle.dumps(registry))
    assert (clone.url, clone.timeout_s, clone.conf) == (url, registry.timeout_s, {})
    assert clone.client is not registry.client


def test_registry_codec_pickles_as_configuration(registry_url):
    _, url = registry_url
    codec = WireCodec(registry_url=url)
    data = codec.encode(EVENTS[6])
    clone = pickle.loads(pickle.dumps(codec))
    assert clone.source.registry.url == url
    assert clone.decode(data) == EVENTS[6]


def test_registry_answer_that_is_not_an_avro_record_is_an_unknown_id(registry_url):
    server, url = registry_url
    server.schemas[7] = {"schema": '{"type": "object"}', "schemaType": "JSON"}
    server.schemas[8] = {"schema": '"string"'}
    codec = WireCodec(registry_url=url)
    for sid in (7, 8):
        with pytest.raises(UnknownSchemaIdError):
            codec.decode(wire.header(sid) + b"\x00")


def test_registry_transient_error_is_retried_by_the_client(registry_url):
    server, url = registry_url
    sid = SchemaRegistry(url).register("x-value", wire.reader_schema(FollowEvent))
    server.fail_next = 1
    registry = SchemaRegistry(url, conf={"max.retries": 1, "retries.wait.ms": 1})
    assert registry.schema_by_id(sid) == wire.reader_schema(FollowEvent)
    assert server.requests[-2:] == [("GET", f"/schemas/ids/{sid}")] * 2


@pytest.mark.parametrize("case", ["refused", "503", "wrong_path"])
def test_registry_failure_is_not_a_malformed_record(registry_url, case):
    server, url = registry_url
    if case == "refused":
        url = "http://127.0.0.1:9"  # discard port: connection refused
    elif case == "503":
        server.fail_next = 10
    else:
        url += "/not-the-registry"  # a 404 that is no registry answer
    codec = WireCodec(RegistrySchemaSource(SchemaRegistry(url, conf={"max.retries": 0})))
    with pytest.raises(SchemaRegistryError) as info:
        codec.decode(wire.header(1) + b"\x00")
    assert not isinstance(info.value, MalformedRecordError)
    assert "fetching schema 1 at " + url in str(info.value)
    with pytest.raises(SchemaRegistryError, match="registering demo-value"):
        codec.encode(EVENTS[0], topic="demo")


def test_registry_url_is_checked_when_the_codec_is_made():
    with pytest.raises(ValueError, match="Invalid url"):
        WireCodec(registry_url="127.0.0.1:8081")


def test_source_and_registry_url_are_exclusive():
    with pytest.raises(ValueError):
        WireCodec(StaticSchemaSource(), registry_url="http://x")


# --------------------------------------------------------------- peek_event_time


def test_every_event_schema_starts_with_event_id_then_event_time():
    # peek_event_time relies on this layout of every schema version.
    from schemas.codec import AVRO_DIR

    for path in sorted(AVRO_DIR.glob("*.avsc")):
        fields = json.loads(path.read_text())["fields"]
        assert [(f["name"], f["type"]) for f in fields[:2]] == [
            ("event_id", "string"), ("event_time", "long")], path.name


@given(st.text(max_size=80), st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_peek_event_time_matches_the_decoded_event(event_id, event_time):
    from schemas.codec import peek_event_time
    from schemas.events import FollowEvent, FollowKind

    event = FollowEvent(event_id=event_id, event_time=event_time, kind=FollowKind.FOLLOW,
                        follower_id=1, followee_id=2)
    data = WireCodec().encode(event)
    assert peek_event_time(data) == event_time == WireCodec().decode(data).event_time


@pytest.mark.parametrize("data", [None, b"", b"\x00\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01\x02a\x02",
                                  b"\x00\x00\x00\x00\x01\x7f", b"\x00\x00\x00\x00\x01\x02a\xff\xff"])
def test_peek_event_time_is_none_for_unreadable_bytes(data):
    from schemas.codec import peek_event_time

    assert peek_event_time(data) is None
