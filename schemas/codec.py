"""Confluent wire format for the event topics: encode typed events, decode bytes back.

A value is ``0x00``, a 4-byte big-endian schema id, then the Avro body::

    codec = WireCodec()                                       # static ids (the default)
    codec = WireCodec(registry_url="http://127.0.0.1:8081")   # ids from a Schema Registry
    event = codec.decode(codec.encode(event))

Undecodable bytes raise a ``MalformedRecordError`` subclass (for the DLQ), a
failing registry ``SchemaRegistryError`` (retry). Design: ``docs/schemas.md``;
``python -m schemas.codec`` benchmarks encode and decode.
"""
from __future__ import annotations

import io
import json
import re
import struct
from functools import cache
from pathlib import Path
from typing import Mapping, Protocol

import fastavro

from schemas.events import EVENT_TYPES, Event

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size  # 5

AVRO_DIR = Path(__file__).resolve().parent / "avro"

#: The static schema ids: id -> (schema name, version), one ``.avsc`` each.
#: Ids are never reused or renumbered: a new schema version gets a new id.
STATIC_SCHEMA_IDS: dict[int, tuple[str, int]] = {
    1: ("post_event", 1),
    2: ("engagement_event", 1),
    3: ("story_event", 1),
    4: ("follow_event", 1),
}

# Record types by Avro record name without namespace, so a later namespace
# (say ``io.feedbeam.events.v2``) still maps to the same Python type.
_TYPES_BY_RECORD_NAME: dict[str, type] = {t.__name__: t for t in EVENT_TYPES}
_TYPES_BY_SCHEMA_NAME: dict[str, type] = {t.SCHEMA_NAME: t for t in EVENT_TYPES}
_AVSC_NAME = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


# --------------------------------------------------------------------------- errors


class MalformedRecordError(ValueError):
    """The bytes are not a decodable event; ``reason`` says why, for the DLQ."""

    reason = "malformed"

    def __init__(self, message: str, *, schema_id: int | None = None):
        super().__init__(message)
        self.schema_id = schema_id


class TooShortError(MalformedRecordError):
    """Empty, or shorter than the 5-byte header."""

    reason = "too_short"


class WrongMagicError(MalformedRecordError):
    """First byte is not the Confluent magic byte 0."""

    reason = "wrong_magic"


class UnknownSchemaIdError(MalformedRecordError):
    """The schema id is not known to the schema source (or not an event record)."""

    reason = "unknown_schema_id"


class TruncatedRecordError(MalformedRecordError):
    """The Avro body ends before the record does."""

    reason = "truncated"


class BadBodyError(MalformedRecordError):
    """The Avro body does not decode to a valid record, or has trailing bytes."""

    reason = "bad_body"


class SchemaTopicMismatchError(MalformedRecordError):
    """The record decodes, but to a different event type than the topic carries."""

    reason = "schema_topic_mismatch"


class SchemaRegistryError(RuntimeError):
    """The Schema Registry failed or could not be reached (transient, not a bad record)."""


# --------------------------------------------------------------------------- schemas


@cache
def _load_avsc(schema_name: str, version: int) -> dict:
    path = AVRO_DIR / f"{schema_name}.v{version}.avsc"
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@cache
def current_version(schema_name: str) -> int:
    """Newest version of ``schema_name`` among the ``.avsc`` files."""
    versions = [
        int(m["version"])
        for p in AVRO_DIR.iterdir()
        if (m := _AVSC_NAME.match(p.name)) and m["name"] == schema_name
    ]
    if not versions:
        raise LookupError(f"no Avro schema file for {schema_name!r} in {AVRO_DIR}")
    return max(versions)


def reader_schema(record_type: type) -> dict:
    """The current (newest) Avro schema of ``record_type``, as JSON (a dict)."""
    name = record_type.SCHEMA_NAME
    return _load_avsc(name, current_version(name))


def _record_name(schema: dict) -> str:
    return str(schema.get("name", "")).rsplit(".", 1)[-1]


class SchemaSource(Protocol):
    """Where schema ids come from: fixed ids, or a Schema Registry."""

    def schema(self, schema_id: int) -> dict | None:
        """The writer schema (JSON) registered under ``schema_id``; None if unknown."""

    def schema_id(self, record_type: type, topic: str) -> int:
        """The id to write ``record_type`` records to ``topic`` with."""


class StaticSchemaSource:
    """Fixed schema ids, no registry: ``STATIC_SCHEMA_IDS`` unless ``schemas`` is given.

    ``schemas`` maps id -> schema JSON (tests use it for evolution). A record
    type is written with the id of its current reader schema, or with the
    highest id carrying that record name.
    """

    def __init__(self, schemas: Mapping[int, dict] | None = None):
        self._given = dict(schemas) if schemas is not None else None
        self._schemas: dict[int, dict] | None = None
        self._write_ids: dict[type, int] = {}

    def _all(self) -> dict[int, dict]:
        if self._schemas is None:
            if self._given is not None:
                self._schemas = self._given
            else:
                self._schemas = {
                    sid: _load_avsc(name, version)
                    for sid, (name, version) in STATIC_SCHEMA_IDS.items()
                }
        return self._schemas

    def schema(self, schema_id: int) -> dict | None:
        return self._all().get(schema_id)

    def schema_id(self, record_type: type, topic: str) -> int:
        sid = self._write_ids.get(record_type)
        if sid is None:
            schemas = self._all()
            current = reader_schema(record_type)
            same = [i for i, s in schemas.items() if s == current]
            named = [i for i, s in schemas.items() if _record_name(s) == record_type.__name__]
            if not (same or named):
                raise LookupError(f"no static schema id for {record_type.__name__}")
            sid = self._write_ids[record_type] = max(same or named)
        return sid

    def __reduce__(self):
        return (StaticSchemaSource, (self._given,))


# The registry's error code for "no schema with this id"; a 404 without it is
# not the registry answering (a wrong URL path, say), so it is no verdict on a record.
_SCHEMA_NOT_FOUND = 40403


class SchemaRegistry:
    """A Confluent Schema Registry through ``confluent_kafka``'s ``SchemaRegistryClient``.

    Registers a schema under a subject (``register``) and fetches one by id
    (``schema_by_id``); the client caches both answers. ``conf`` adds client
    properties (``basic.auth.user.info``, ``ssl.ca.location``, ``max.retries``,
    ...). Pickles as its configuration; the client is rebuilt where it lands.
    """

    def __init__(self, url: str, timeout_s: float = 5.0, conf: Mapping[str, object] | None = None):
        # Imported here, not at the top: codecs with static ids (the default)
        # never need the client, and it brings a large HTTP stack with it.
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.conf = dict(conf or {})
        self.client = SchemaRegistryClient({"timeout": timeout_s, **self.conf, "url": self.url})
        # The subject each id was registered under by this process: looking the
        # id up with it hits the client's per-subject cache, not the registry.
        self._subjects: dict[int, str] = {}

    def register(self, subject: str, schema: dict) -> int:
        """Register ``schema`` under ``subject`` (the same schema keeps its id); returns the id."""
        from confluent_kafka.schema_registry import Schema

        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        try:
            sid = self.client.register_schema(subject, Schema(schema_str=text, schema_type="AVRO"))
        except Exception as exc:  # see _failed
            raise self._failed(f"registering {subject}", exc) from exc
        self._subjects[sid] = subject
        return sid

    def schema_by_id(self, schema_id: int) -> dict | None:
        """The Avro schema with ``schema_id``; None if the registry has no such (Avro) schema."""
        from confluent_kafka.schema_registry import SchemaRegistryError as ClientError

        try:
            schema = self.client.get_schema(schema_id, subject_name=self._subjects.get(schema_id))
        except Exception as exc:  # see _failed
            if (isinstance(exc, ClientError) and exc.http_status_code == 404
                    and exc.error_code == _SCHEMA_NOT_FOUND):
                return None
            raise self._failed(f"fetching schema {schema_id}", exc) from exc
        if schema.schema_type != "AVRO":
            return None
        writer = json.loads(schema.schema_str)
        return writer if isinstance(writer, dict) else None

    def _failed(self, doing: str, exc: Exception) -> SchemaRegistryError:
        # The client raises its own SchemaRegistryError for an HTTP answer and
        # lets its HTTP library's (httpx's or httpx2's) errors through, once its
        # retries of transient failures are spent: all of them mean the same here.
        return SchemaRegistryError(f"{doing} at {self.url}: {exc!r}")

    def __reduce__(self):
        return (SchemaRegistry, (self.url, self.timeout_s, self.conf))


class RegistrySchemaSource:
    """Schema ids from a Schema Registry; records are written under ``<topic>-value``."""

    def __init__(self, registry: SchemaRegistry):
        self.registry = registry

    def schema(self, schema_id: int) -> dict | None:
        return self.registry.schema_by_id(schema_id)

    def schema_id(self, record_type: type, topic: str) -> int:
        return self.registry.register(f"{topic}-value", reader_schema(record_type))


# --------------------------------------------------------------------------- codec


class _Decoder:
    """Everything needed to decode one schema id, parsed once."""

    __slots__ = ("record_type", "writer", "reader")

    def __init__(self, record_type: type, writer: dict, reader: dict | None):
        self.record_type = record_type
        self.writer = writer
        self.reader = reader


class WireCodec:
    """Encode events to, and decode events from, the Confluent wire format.

    Takes a ``source`` (default: ``StaticSchemaSource()``) or a
    ``registry_url``. ``reader_schemas`` overrides the reader schema per record
    type (tests of schema evolution). Picklable: only configuration travels,
    parsed schemas are rebuilt lazily where the codec is used.
    """

    def __init__(
        self,
        source: SchemaSource | None = None,
        *,
        registry_url: str | None = None,
        reader_schemas: Mapping[type, dict] | None = None,
    ):
        if source is not None and registry_url is not None:
            raise ValueError("give a schema source or a registry URL, not both")
        if source is None:
            source = (
                RegistrySchemaSource(SchemaRegistry(registry_url))
                if registry_url
                else StaticSchemaSource()
            )
        self.source = source
        self._reader_overrides = dict(reader_schemas or {})
        self._decoders: dict[int, _Decoder] = {}
        self._encoders: dict[tuple[type, str], tuple[bytes, dict]] = {}

    def __reduce__(self):
        return (_rebuild_codec, (self.source, self._reader_overrides))

    # -- encode

    def _encoder(self, record_type: type, topic: str) -> tuple[bytes, dict]:
        key = (record_type, topic)
        enc = self._encoders.get(key)
        if enc is None:
            sid = self.source.schema_id(record_type, topic)
            schema = self.source.schema(sid)
            if schema is None:
                raise LookupError(f"schema id {sid} for {record_type.__name__} has no schema")
            enc = self._encoders[key] = (
                _HEADER.pack(MAGIC_BYTE, sid),
                fastavro.parse_schema(schema, named_schemas={}),
            )
        return enc

    def encode(self, event: Event, topic: str | None = None) -> bytes:
        """Wire bytes of ``event``; ``topic`` (default: the type's topic) picks the subject."""
        record_type = type(event)
        header, schema = self._encoder(record_type, topic or record_type.TOPIC)
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, schema, event.to_avro(), strict=True)
        return buf.getvalue()

    def schema_id_of(self, record_type: type, topic: str | None = None) -> int:
        """The schema id ``encode`` writes for ``record_type`` on ``topic``."""
        return _HEADER.unpack(self._encoder(record_type, topic or record_type.TOPIC)[0])[1]

    # -- decode

    def _decoder(self, schema_id: int) -> _Decoder:
        dec = self._decoders.get(schema_id)
        if dec is None:
            writer = self.source.schema(schema_id)
            record_type = None if writer is None else _TYPES_BY_RECORD_NAME.get(_record_name(writer))
            if record_type is None:
                raise UnknownSchemaIdError(
                    f"schema id {schema_id} is not a known event schema", schema_id=schema_id
                )
            reader = self._reader_overrides.get(record_type) or reader_schema(record_type)
            parsed_writer = fastavro.parse_schema(writer, named_schemas={})
            # Same schema: skip resolution entirely (fastavro's fast path).
            parsed_reader = (
                None if reader == writer else fastavro.parse_schema(reader, named_schemas={})
            )
            dec = self._decoders[schema_id] = _Decoder(record_type, parsed_writer, parsed_reader)
        return dec

    def decode_dict(self, data: bytes, expected_type: type | None = None) -> tuple[type, dict]:
        """``(record type, Avro dict in the reader schema)`` of wire bytes ``data``.

        Raises a ``MalformedRecordError`` subclass if ``data`` is not a valid
        message, ``SchemaTopicMismatchError`` if ``expected_type`` is given and
        the schema id belongs to another type.
        """
        if data is None or len(data) < HEADER_SIZE:
            n = 0 if data is None else len(data)
            raise TooShortError(f"{n} bytes, a message has at least {HEADER_SIZE}")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise WrongMagicError(f"magic byte {magic}, expected {MAGIC_BYTE}")
        dec = self._decoders.get(schema_id) or self._decoder(schema_id)
        if expected_type is not None and dec.record_type is not expected_type:
            raise SchemaTopicMismatchError(
                f"schema id {schema_id} is a {dec.record_type.__name__}, "
                f"expected a {expected_type.__name__}",
                schema_id=schema_id,
            )
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(buf, dec.writer, dec.reader)
        except EOFError as exc:
            raise TruncatedRecordError(
                f"Avro body ends early: {exc}", schema_id=schema_id
            ) from exc
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise BadBodyError(
                f"Avro body does not decode: {type(exc).__name__}: {exc}", schema_id=schema_id
            ) from exc
        if buf.tell() != len(data):
            raise BadBodyError(
                f"{len(data) - buf.tell()} trailing bytes after the record", schema_id=schema_id
            )
        return dec.record_type, record

    def decode(self, data: bytes, expected_type: type | None = None) -> Event:
        """The typed event in wire bytes ``data`` (see ``decode_dict`` for errors)."""
        record_type, record = self.decode_dict(data, expected_type)
        try:
            return record_type.from_avro(record)
        except (KeyError, ValueError, TypeError) as exc:
            raise BadBodyError(
                f"record does not fit {record_type.__name__}: {exc}",
                schema_id=_HEADER.unpack_from(data)[1],
            ) from exc


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zigzag varint) at ``pos``: ``(value, next position)``."""
    result = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def peek_event_time(data: bytes | None) -> int | None:
    """The ``event_time`` of wire bytes without decoding the record; None if unreadable.

    Every event schema starts with ``event_id`` (string) then ``event_time``
    (long), a rule ``tests/unit/test_codec.py`` holds the ``.avsc`` files to,
    so the time sits right after one length-prefixed string. The Kafka source
    uses this to timestamp records by event time without decoding them; bytes
    it cannot read are left to the decode step to dead-letter.
    """
    if data is None or len(data) < HEADER_SIZE + 2 or data[0] != MAGIC_BYTE:
        return None
    try:
        id_length, pos = _read_long(data, HEADER_SIZE)
        if id_length < 0:
            return None
        event_time, _ = _read_long(data, pos + id_length)
        return event_time
    except (IndexError, ValueError):
        return None


def _rebuild_codec(source, reader_overrides):
    return WireCodec(source, reader_schemas=reader_overrides)


def header(schema_id: int) -> bytes:
    """The 5-byte wire header for ``schema_id`` (tests and tools build messages with it)."""
    return _HEADER.pack(MAGIC_BYTE, schema_id)


# --------------------------------------------------------------------------- bench


def _bench(n: int = 200_000) -> None:
    """Print µs/record for encode and decode of a typical engagement event."""
    import time

    from schemas.events import EngagementEvent, EngagementKind, MediaType

    codec = WireCodec()
    event = EngagementEvent(
        event_id="e-0123456789abcdef", event_time=1_700_000_000_000, kind=EngagementKind.VIEW,
        viewer_id=123_456, author_id=789, post_id=987_654_321, media_type=MediaType.VIDEO,
        dwell_ms=1_500,
    )
    data = codec.encode(event)
    assert codec.decode(data) == event
    for label, fn in (
        ("encode", lambda: codec.encode(event)),
        ("decode_dict", lambda: codec.decode_dict(data)),
        ("decode", lambda: codec.decode(data)),
    ):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        print(f"{label:12s} {dt / n * 1e6:6.2f} us/record  ({n / dt:,.0f} records/s, {len(data)} bytes)")


if __name__ == "__main__":
    _bench()
