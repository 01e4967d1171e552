"""The HTTP floor of bench/bench_serving.py: the cheapest ASGI app that answers a feed read.

It checks that an ``Authorization`` header is there and answers a constant JSON
body the size of a 20-item feed page: no token check, no Redis, no JSON
encoding. Served by the same server, workers and load generator as the API,
its latency and requests/s at the target rate are what this machine allows
any Python ASGI app before it does any work.

    python bench/floor_app.py PORT WORKERS
"""
from __future__ import annotations

import sys

import orjson

_ITEM = {"post_id": 123456789, "author_id": 1234, "created_at": 1_790_000_000_000,
         "media_type": "PHOTO", "caption_len": 120, "hashtags": ["tag"], "score": 0.5}
BODY = orjson.dumps({"user_id": 1, "kind": "ranked", "source": "redis", "model_version": "v1",
                     "items": [_ITEM] * 20, "next_cursor": "x" * 60})
_HEADERS = [(b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode())]
_UNAUTHORIZED = [(b"content-type", b"application/json"), (b"content-length", b"2")]


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        return
    authorized = any(name == b"authorization" for name, _ in scope["headers"])
    await send({"type": "http.response.start", "status": 200 if authorized else 401,
                "headers": _HEADERS if authorized else _UNAUTHORIZED})
    await send({"type": "http.response.body", "body": BODY if authorized else b"{}"})


def main(argv: list[str]) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    port, workers = int(argv[0]), int(argv[1])
    Granian("bench.floor_app:app", address="127.0.0.1", port=port, interface=Interfaces.ASGI,
            workers=workers, loop=Loops.uvloop, log_access=False).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
