"""uvicorn's httptools protocol with the edges granian has built in: header size and header time.

uvicorn with httptools bounds neither how many bytes of request line and
headers it buffers nor how long a client may take to send them (its
keep-alive timer stops at the first byte, so one byte every few seconds holds
a connection for ever). ``BoundedHttpToolsProtocol`` answers 431 past
``max_header_bytes`` and closes a connection whose next request's headers are
not complete within ``header_read_timeout_s``, from the ``ServingConfig`` that
``feedbeam serve`` hands its workers (defaults without one).

    uvicorn.run(..., http="serving.http_limits:BoundedHttpToolsProtocol")
"""
from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.config import CONFIG_ENV, ServingConfig, config_from_environment


def _limits() -> tuple[int, float]:
    import os

    if os.environ.get(CONFIG_ENV):
        config = config_from_environment()
        return config.max_header_bytes, config.header_read_timeout_s
    return ServingConfig.max_header_bytes, ServingConfig.header_read_timeout_s


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"status": status, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """See the module doc. Bytes count toward the header limit from the end of
    one request (or the connection's start) until the next one's headers end."""

    _limits: tuple[int, float] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if BoundedHttpToolsProtocol._limits is None:
            BoundedHttpToolsProtocol._limits = _limits()
        self.max_header_bytes, self.header_read_timeout_s = BoundedHttpToolsProtocol._limits
        self._header_bytes = 0
        self._reading_headers = False
        self._header_timer: asyncio.TimerHandle | None = None

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_bytes = 0
        self._reading_headers = True
        self._header_timer = self.loop.call_later(self.header_read_timeout_s, self._too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_refusal(408, "Request Timeout", "request headers not received "
                                          f"within {self.header_read_timeout_s:g} s"))
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._stop_header_timer()
                self._reading_headers = False
                self.transport.write(_refusal(431, "Request Header Fields Too Large",
                                              f"request line and headers over "
                                              f"{self.max_header_bytes} bytes"))
                self.transport.close()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()
