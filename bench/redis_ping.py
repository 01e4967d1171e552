"""How long Redis takes to answer a PING, sampled in a process of its own.

    python bench/redis_ping.py --port 6379 --seconds 10 [--interval-ms 5]

Prints one JSON object: the round trips' count (``n``), p50, p99 and max in ms
(``bench.ladder.latency_summary``). A PING
costs Redis nothing, so its round trip is what any command of the serving API
waits before Redis gets to it: the commands and scripts ahead of it, and Redis
itself waiting for a core. ``bench_e2e.py`` runs it beside the load generator,
in a process of its own so that the benchmark's threads (and their GIL) do not
delay the replies' reading.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ladder import latency_summary  # noqa: E402

PING, PONG = b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"


def sample(host: str, port: int, seconds: float, interval_s: float) -> list[float]:
    """Round trips of one PING every ``interval_s`` for ``seconds``, in ms."""
    rtts: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        while next_at < end:
            started = time.perf_counter()
            sock.sendall(PING)
            reply = b""
            while len(reply) < len(PONG):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                reply += chunk
            if reply != PONG:
                raise ValueError(f"unexpected reply to PING: {reply!r}")
            rtts.append((time.perf_counter() - started) * 1000)
            next_at += interval_s
            time.sleep(max(0.0, next_at - time.monotonic()))
    return rtts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.interval_ms <= 0:
        parser.error("--seconds and --interval-ms must be > 0")
    print(json.dumps(latency_summary(sample(args.host, args.port, args.seconds,
                                            args.interval_ms / 1000))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
