"""The generation marker of a Redis key prefix and the lock of its restore.

    generation = RedisGeneration(client, KeyLayout("fb"))
    token = generation.read()          # None: Redis lost this prefix's data
    if generation.try_lock(me):        # SET NX PX: one restorer at a time
        ...                            # restore from Cassandra
        generation.mark()              # a new token: Redis holds data again
        generation.unlock(me)

Redis is a cache: a restart without persistence, a flush or an eviction leaves
it empty while Cassandra keeps everything. ``KeyLayout.generation`` tells the
two apart; ``stores.restore.RedisHealer`` builds the jobs' check on it. Design:
docs/operations.md, "Redis lost its data".
"""
from __future__ import annotations

import time
import uuid

from schemas.keys import KeyLayout

# Compare-and-act on the lock: only its holder extends or releases it (a holder
# whose lock expired must not release the next holder's).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def new_token() -> str:
    """A token no other writer picks: the wall-clock ms (for a reader of the key) and
    random hex."""
    return f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"


class RedisGeneration:
    """The generation marker and restore lock of one prefix, on a redis-py ``client``.

    ``lock_ttl_ms`` bounds how long a restorer that died keeps the others
    waiting; a live restorer calls ``extend`` well within it."""

    def __init__(self, client, keys: KeyLayout, lock_ttl_ms: int = 60_000):
        self.client = client
        self.keys = keys
        self.lock_ttl_ms = lock_ttl_ms
        self._unlock = client.register_script(_UNLOCK)
        self._extend = client.register_script(_EXTEND)

    def read(self) -> str | None:
        """The current generation token; None when the marker is missing."""
        value = self.client.get(self.keys.generation())
        return None if value is None else value.decode()

    def mark(self, token: str | None = None) -> str:
        """Write a new generation token (or ``token``); returns it."""
        token = token or new_token()
        self.client.set(self.keys.generation(), token)
        return token

    def mark_if_missing(self) -> str:
        """The current token, writing a new one first if there is none (a Redis found
        empty with nothing to restore)."""
        token = new_token()
        if self.client.set(self.keys.generation(), token, nx=True):
            return token
        return self.read() or self.mark(token)

    def try_lock(self, holder: str) -> bool:
        """Take the restore lock for ``holder`` unless someone holds it."""
        return bool(self.client.set(self.keys.restore_lock(), holder, nx=True,
                                    px=self.lock_ttl_ms))

    def extend(self, holder: str) -> bool:
        """Push the lock's expiry ``lock_ttl_ms`` out, if ``holder`` still holds it."""
        return bool(self._extend(keys=[self.keys.restore_lock()],
                                 args=[holder, self.lock_ttl_ms]))

    def unlock(self, holder: str) -> None:
        """Release the lock if ``holder`` still holds it."""
        self._unlock(keys=[self.keys.restore_lock()], args=[holder])
