"""Bearer-token auth: HS256 JWTs whose ``sub`` is the user id.

``TokenAuth.user_id(header)`` returns the caller's user id or raises
``AuthError`` (401) for a missing, malformed, forged or expired token.
Verified tokens are cached until they expire (a feed client sends the same
token on every scroll), so the signature is checked once per token, not once
per request; the cache is bounded and only ever holds tokens that verified.

``issue_token`` makes one for local use (``feedbeam token USER``).
"""
from __future__ import annotations

import time
from typing import Callable

import jwt

ALGORITHM = "HS256"
#: Seconds of clock skew tolerated on ``exp``/``iat``.
LEEWAY_S = 5
#: RFC 7518 3.2: an HS256 key at least as long as the hash.
MIN_KEY_BYTES = 32


class AuthError(Exception):
    """The request is not authenticated (HTTP 401); the message says why."""


def issue_token(key: str, user_id: int, ttl_s: int = 3600, now_s: float | None = None) -> str:
    """A signed token for ``user_id`` valid ``ttl_s`` seconds."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = int(time.time() if now_s is None else now_s)
    return jwt.encode({"sub": str(user_id), "iat": now, "exp": now + ttl_s}, key, algorithm=ALGORITHM)


class TokenAuth:
    """Verifies bearer tokens with ``key`` (see module doc)."""

    def __init__(self, key: str, cache_size: int = 100_000, clock: Callable[[], float] = time.time):
        if len(key.encode()) < MIN_KEY_BYTES:
            raise ValueError(f"the JWT key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._cache: dict[str, tuple[int, float]] = {}
        self._cache_size = cache_size
        self._clock = clock

    def user_id(self, authorization: str | None) -> int:
        """The user id of an ``Authorization: Bearer <jwt>`` header value."""
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        token = token.strip()
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] + LEEWAY_S > now:
                return hit[0]
            del self._cache[token]
            raise AuthError("token expired")
        user_id, exp = self._verify(token, now)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # crude but bounded; refilled by the next requests
        self._cache[token] = (user_id, exp)
        return user_id

    def _verify(self, token: str, now: float) -> tuple[int, float]:
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], leeway=LEEWAY_S,
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user_id = parse_user_id(claims["sub"])
        if user_id is None:
            raise AuthError("invalid token: 'sub' must be a user id: ASCII digits 0-9, "
                            f"at most {USER_ID_MAX}")
        return user_id, float(claims["exp"])


#: The largest user id (Cassandra bigint).
USER_ID_MAX = 2 ** 63 - 1


def parse_user_id(text) -> int | None:
    """``text`` as a user id, or None unless it is 1-19 ASCII decimal digits up to
    ``USER_ID_MAX``. ``str.isdigit`` alone also accepts "²" (which ``int`` then
    refuses) and other scripts' digits ("١٢" is 12 to ``int``)."""
    if (not isinstance(text, str) or not 0 < len(text) <= 19 or not text.isascii()
            or not text.isdigit()):
        return None
    value = int(text)
    return value if value <= USER_ID_MAX else None
