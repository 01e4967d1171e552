"""The OpenAPI 3.0 description of the serving API, served at ``/openapi.json``.

Written by hand next to the routes of ``serving.app`` (the app has no
framework to derive it from); ``tests/integration/test_serving_api.py`` runs
schemathesis over it against the real app.
"""
from __future__ import annotations

from typing import Any

from serving.auth import USER_ID_MAX as INT64_MAX


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_USER = {"name": "user_id", "in": "path", "required": True,
         "description": "The caller's own user id (the token's subject).",
         "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": INT64_MAX}}
_CURSOR = {"name": "cursor", "in": "query", "required": False,
           "description": "Opaque cursor from the previous page's next_cursor.",
           "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
_COMMON_ERRORS = {
    "400": _error("Bad input (limit out of range, bad cursor, bad id)."),
    "401": _error("Missing, malformed, forged or expired bearer token."),
    "403": _error("The token's user is not the user in the path."),
    "413": _error("A request body (no route takes one)."),
    "503": _error("Neither Redis nor Cassandra could answer within the budget, or the "
                  "server is overloaded (Retry-After)."),
}


def _limit(default: int, maximum: int) -> dict:
    return {"name": "limit", "in": "query", "required": False,
            "description": "Entries per page.",
            "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}}


def _feed_op(summary: str, op_id: str, default: int, maximum: int) -> dict:
    return {"get": {
        "summary": summary, "operationId": op_id, "security": [{"bearerAuth": []}],
        "parameters": [_USER, _limit(default, maximum), _CURSOR],
        "responses": {"200": _ok("A page of the feed.", "FeedPage"), **_COMMON_ERRORS},
    }}


def openapi(default_limit: int, max_limit: int) -> dict[str, Any]:
    """The description, with the server's limit bounds."""
    nullable_int = {"type": "integer", "nullable": True}
    post = {"type": "object", "required": ["post_id", "author_id", "created_at"], "properties": {
        "post_id": {"type": "integer"}, "author_id": {"type": "integer"},
        "created_at": {"type": "integer", "description": "ms since the epoch"},
        "media_type": {"type": "string", "nullable": True},
        "caption_length": nullable_int,
        "hashtags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number", "nullable": True,
                  "description": "ranking score (ranked feed; null for posts newer than the ranking)"},
    }}
    feed_page = {"type": "object", "required": ["user_id", "kind", "source", "items", "next_cursor"],
                 "properties": {
                     "user_id": {"type": "integer"},
                     "kind": {"type": "string", "enum": ["ranked", "chronological"]},
                     "source": {"type": "string", "enum": ["redis", "cassandra", "rebuilt"]},
                     "model_version": {"type": "string", "nullable": True},
                     "items": {"type": "array", "items": {"$ref": "#/components/schemas/Post"}},
                     "next_cursor": {"type": "string", "nullable": True,
                                     "description": "pass as ?cursor= for the next page; null at the end"},
                 }}
    story = {"type": "object", "properties": {
        "story_id": {"type": "integer"}, "created_at": {"type": "integer"},
        "expires_at": {"type": "integer"}, "media_type": {"type": "string", "nullable": True},
        "seen": {"type": "boolean"}}}
    tray = {"type": "object", "required": ["user_id", "source", "entries", "next_cursor"],
            "properties": {
        "user_id": {"type": "integer"},
        "next_cursor": {"type": "string", "nullable": True,
                        "description": "the next followees' stories; null at the end"},
        "source": {"type": "string", "enum": ["redis", "cassandra"]},
        "entries": {"type": "array", "items": {"type": "object", "properties": {
            "author_id": {"type": "integer"}, "unseen": {"type": "integer"},
            "latest_created_at": {"type": "integer"},
            "stories": {"type": "array", "items": {"$ref": "#/components/schemas/Story"}}}}},
    }}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "message"],
        "properties": {"status": {"type": "integer"}, "message": {"type": "string"}}}}}
    store_status = {"type": "string", "enum": ["ready", "not ready"]}
    ready = {"type": "object", "required": ["status", "redis", "cassandra"], "properties": {
        "status": {"type": "string", "enum": ["ready", "degraded", "unavailable"]},
        "redis": store_status, "cassandra": store_status}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "feedbeam serving API", "version": "1.0.0",
                 "description": "Ranked and chronological home feeds and the story tray, read "
                                "from the views the feedbeam pipelines precompute."},
        "paths": {
            "/v1/users/{user_id}/feed": _feed_op(
                "Home feed: the ranked feed when the user has one, chronological otherwise.",
                "getFeed", default_limit, max_limit),
            "/v1/users/{user_id}/feed/chronological": _feed_op(
                "Home feed, newest first (pushed posts merged with followed celebrities' posts).",
                "getChronologicalFeed", default_limit, max_limit),
            "/v1/users/{user_id}/stories/tray": {"get": {
                "summary": "Story tray: followed authors with active stories, unseen first.",
                "operationId": "getStoryTray", "security": [{"bearerAuth": []}],
                "parameters": [_USER, _limit(default_limit, max_limit), _CURSOR],
                "responses": {"200": _ok("A page of the tray: the stories of the next "
                                         "followees, most recent follows first.", "Tray"),
                              **_COMMON_ERRORS},
            }},
            "/v1/users/{user_id}/stories/{story_id}/seen": {"post": {
                "summary": "Record that the user saw a story.",
                "operationId": "markStorySeen", "security": [{"bearerAuth": []}],
                "parameters": [_USER, {"name": "story_id", "in": "path", "required": True,
                                       "schema": {"type": "integer", "format": "int64",
                                                  "minimum": 0, "maximum": INT64_MAX}}],
                "responses": {"200": _ok("Recorded.", "Seen"),
                              "404": _error("No such story for this user: unknown, deleted, "
                                            "expired, or its author is not followed."),
                              **_COMMON_ERRORS},
            }},
            "/healthz": {"get": {"summary": "Liveness.", "operationId": "health",
                                 "responses": {"200": _ok("Alive.", "Health")}}},
            "/readyz": {"get": {"summary": "Readiness: which stores answer.",
                                "operationId": "ready",
                                "responses": {"200": _ok("Ready (maybe degraded).", "Ready"),
                                              "503": _ok("No store answers.", "Ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics.", "operationId": "metrics",
                                 "responses": {"200": {"description": "Text exposition format.",
                                                       "content": {"text/plain": {"schema": {
                                                           "type": "string"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "bearerFormat": "JWT"}},
            "schemas": {
                "Post": post, "FeedPage": feed_page, "Story": story, "Tray": tray,
                "Seen": {"type": "object", "required": ["seen"], "properties": {
                    "seen": {"type": "boolean"}, "source": {"type": "string"}}},
                "Health": {"type": "object", "properties": {"status": {"type": "string"}}},
                "Ready": ready, "Error": error,
            },
        },
    }
