"""The envelope of a durable log record (the fan-out's and the stories' logs):
JSON ``{"v": version, "w": [[tag, *fields], ...]}``, and the error a value that
is not one raises (``reason`` becomes the dead letter's error class).
"""
from __future__ import annotations

import orjson


class MalformedLogRecord(ValueError):
    """A durable log record that does not decode; ``reason`` is machine-readable (the
    dead letter's error class)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def dump_log_rows(rows: list[list], version: int) -> bytes:
    """One durable log record value: the ``rows`` (each ``[tag, *fields]``) under a
    format version."""
    return orjson.dumps({"v": version, "w": rows})


def load_log_rows(data: bytes | None, version: int, what: str,
                  error: type[MalformedLogRecord] = MalformedLogRecord) -> list:
    """The rows of a ``dump_log_rows`` value of ``version``; ``error`` (reasons
    ``empty``, ``not_json``, ``bad_format``) if it is not one. ``what`` names the
    log in the messages."""
    if not data:
        raise error("empty", f"empty {what} record")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise error("not_json", f"{what} record is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != version or not isinstance(doc.get("w"), list):
        raise error("bad_format", f"not a version {version} {what} record")
    return doc["w"]
