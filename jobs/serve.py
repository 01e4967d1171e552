"""``feedbeam serve`` runs the serving API; ``feedbeam token USER`` prints a JWT for it.

    export FEEDBEAM_JWT_KEY=...   # 32+ bytes
    feedbeam serve --port 8080 [--workers 2] [--server granian]
    curl -H "Authorization: Bearer $(feedbeam token 7)" \
         http://127.0.0.1:8080/v1/users/7/feed?limit=10

The stores default to the local stack. The key comes from ``--jwt-key``, else
``--jwt-key-file``, else ``FEEDBEAM_JWT_KEY``; worker processes get the settings
as JSON in ``FEEDBEAM_SERVE_CONFIG``. Servers: granian (default) or uvicorn,
both running ``serving.app:create_app``; why: docs/serving.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from infra.settings import StackSettings
from infra.errors import UserFacingError
from schemas import cassandra as cql

SERVERS = ("uvicorn", "granian")


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the HTTP API over the materialized feeds",
        description="Serve ranked and chronological feeds and story trays over HTTP.")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="listen port (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (default: %(default)s; 2 uses both cores)")
    serve.add_argument("--server", choices=SERVERS, default="granian",
                       help="HTTP server (default: %(default)s)")
    _auth_args(serve)
    serve.add_argument("--keyspace", default=cql.DEFAULT_KEYSPACE)
    serve.add_argument("--key-prefix", default="fb", help="Redis key prefix (default: %(default)s)")
    serve.add_argument("--push-threshold", type=int, default=None,
                       help="no longer changes a read: the fan-out keeps the followed "
                            "celebrities a page pulls (kept for existing command lines)")
    serve.add_argument("--feed-cap", type=int, default=None,
                       help="Redis feed cap of the fan-out pipeline (--feed_cap)")
    serve.add_argument("--redis-timeout-ms", type=float, default=None,
                       help="budget of one Redis round trip before falling back to Cassandra")
    serve.add_argument("--cassandra-timeout-ms", type=float, default=None)
    serve.add_argument("--request-budget-ms", type=float, default=None,
                       help="a request taking longer gets 503")
    serve.add_argument("--max-followees-scanned", type=int, default=None,
                       help="follow-list rows a Cassandra fallback reads for story-tray pages "
                            "(deeper pages end there while Redis fails)")
    serve.add_argument("--max-pulled-timelines", type=int, default=None,
                       help="followed celebrities' timelines a feed page pulls at most (the "
                            "most recently followed)")
    serve.add_argument("--tray-followees", type=int, default=None,
                       help="followees whose stories one story-tray page reads")
    serve.add_argument("--max-header-bytes", type=int, default=None,
                       help="request line + headers, then 431 (at least 8192)")
    serve.add_argument("--header-read-timeout-s", type=float, default=None,
                       help="a client must send a request's headers within this, else the "
                            "connection is closed (slow clients)")
    serve.add_argument("--full-gc-every-s", type=float, default=None,
                       help="each worker runs Python's full garbage collection itself this "
                            "often, after freezing what it holds at start (default 600; 0: "
                            "Python's own schedule, whose full collections stall a loaded "
                            "worker for about 0.1 s)")
    serve.set_defaults(handler=handle_serve)

    token = subparsers.add_parser(
        "token", help="print a bearer token (JWT) for a user, for local use",
        description="Print a signed JWT whose subject is USER.")
    token.add_argument("user", type=int, metavar="USER")
    token.add_argument("--ttl", type=int, default=3600, help="seconds valid (default: %(default)s)")
    _auth_args(token)
    token.set_defaults(handler=handle_token)


KEY_ENV = "FEEDBEAM_JWT_KEY"


def _auth_args(parser) -> None:
    parser.add_argument("--jwt-key", default=None,
                        help=f"HS256 signing key (32+ bytes; default: ${KEY_ENV})")
    parser.add_argument("--jwt-key-file", type=Path, default=None,
                        help="file holding the signing key (first line)")


def _jwt_key(args) -> str:
    from serving.auth import MIN_KEY_BYTES

    key = args.jwt_key
    if key is None and args.jwt_key_file is not None:
        try:
            key = args.jwt_key_file.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise UserFacingError(f"cannot read --jwt-key-file {args.jwt_key_file}: {exc}") from None
    if key is None:
        key = os.environ.get(KEY_ENV)
    if not key:
        raise UserFacingError(f"give the signing key with --jwt-key, --jwt-key-file or ${KEY_ENV}")
    if len(key.encode()) < MIN_KEY_BYTES:
        raise UserFacingError(f"the JWT key must be at least {MIN_KEY_BYTES} bytes (HS256)")
    return key


def build_config(args, settings: StackSettings):
    from serving.config import ServingConfig

    overrides = {}
    for arg, field, scale in (("push_threshold", "push_threshold", None),
                              ("feed_cap", "feed_cap", None),
                              ("redis_timeout_ms", "redis_timeout_s", 1000),
                              ("cassandra_timeout_ms", "cassandra_timeout_s", 1000),
                              ("request_budget_ms", "request_budget_s", 1000),
                              ("max_followees_scanned", "max_followees_scanned", None),
                              ("max_pulled_timelines", "max_pulled_timelines", None),
                              ("tray_followees", "tray_followees", None),
                              ("max_header_bytes", "max_header_bytes", None),
                              ("header_read_timeout_s", "header_read_timeout_s", None),
                              ("full_gc_every_s", "full_gc_every_s", None)):
        value = getattr(args, arg)
        if value is not None:
            overrides[field] = value / scale if scale else value
    try:
        cql.check_keyspace_name(args.keyspace)
        return ServingConfig(
            jwt_key=_jwt_key(args), redis_url=settings.redis_url, key_prefix=args.key_prefix,
            cassandra_host=settings.cassandra_host, cassandra_port=settings.cassandra_port,
            keyspace=args.keyspace, **overrides)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None


def handle_serve(args, settings: StackSettings) -> int:
    if args.workers < 1:
        raise UserFacingError("--workers must be at least 1")
    if not 0 < args.port < 65536:
        raise UserFacingError("--port must be between 1 and 65535")
    config = build_config(args, settings)
    from serving.config import CONFIG_ENV

    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    print(f"serving on http://{args.host}:{args.port} ({args.server}, {args.workers} worker(s)); "
          f"Redis {config.redis_url}, Cassandra {config.cassandra_host}:{config.cassandra_port}/"
          f"{config.keyspace}", flush=True)
    run_server(args.server, args.host, args.port, args.workers, config)
    return 0


def server_options(server: str, config) -> dict:
    """The HTTP server's edges from ``config``: HTTP/1.1 only (granian's HTTP/2 would
    take 16 MiB of headers), request line + headers up to ``max_header_bytes``
    (431 past it), ``header_read_timeout_s`` to send them (slow clients), idle
    keep-alive ``keep_alive_s``. Bodies past ``max_body_bytes`` are the app's 413."""
    if server == "granian":
        from granian.constants import HTTPModes
        from granian.http import HTTP1Settings

        return {"http": HTTPModes.http1, "backlog": 2048,
                "http1_settings": HTTP1Settings(
                    header_read_timeout=int(config.header_read_timeout_s * 1000),
                    keep_alive=True, max_buffer_size=config.max_header_bytes)}
    return {"http": "serving.http_limits:BoundedHttpToolsProtocol", "backlog": 2048,
            "timeout_keep_alive": config.keep_alive_s}


def run_server(server: str, host: str, port: int, workers: int, config) -> None:
    """Serve ``serving.app:create_app`` (its config in ``CONFIG_ENV``) until stopped."""
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        Granian("serving.app:create_app", address=host, port=port, interface=Interfaces.ASGI,
                workers=workers, loop=Loops.uvloop, factory=True, log_access=False,
                **server_options(server, config)).serve()
        return
    import uvicorn

    uvicorn.run("serving.app:create_app", factory=True, host=host, port=port, workers=workers,
                loop="uvloop", lifespan="on", access_log=False, log_level="warning",
                **server_options(server, config))


def handle_token(args, settings: StackSettings) -> int:
    from serving.auth import issue_token

    if args.user < 0:
        raise UserFacingError("USER must be a non-negative user id")
    if args.ttl < 1:
        raise UserFacingError("--ttl must be at least 1 second")
    print(issue_token(_jwt_key(args), args.user, args.ttl))
    return 0
