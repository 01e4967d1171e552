"""The Cassandra schema: versioned migrations, table names and time buckets.

Migrations are the numbered files ``schemas/cql/NNNN_name.cql``, applied by
``stores.cassandra.session.migrate()`` (``feedbeam migrate``); table names and
the feed bucket function are defined here once for the pipelines (writers) and
serving (readers). Migration rules: docs/architecture.md, "Cassandra schema".

    from stores.cassandra.session import migrate, new_cluster
    migrate(new_cluster("127.0.0.1", 9042).connect(), "feedbeam", replication_factor=1)
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

CQL_DIR = Path(__file__).resolve().parent / "cql"
DEFAULT_KEYSPACE = "feedbeam"
MIGRATIONS_TABLE = "schema_migrations"
DDL_TIMEOUT_S = 120.0

# Table names (see cql/0001_init.cql for keys and partitioning).
FOLLOWERS_BY_USER = "followers_by_user"
FOLLOWING_BY_USER = "following_by_user"
FOLLOWER_COUNTS = "follower_counts"
POSTS = "posts"
HOME_FEED_BY_USER = "home_feed_by_user"
AUTHOR_TIMELINE = "author_timeline"
USER_ACTIVITY = "user_activity"
POST_FEATURES = "post_features"
AUTHOR_FEATURES = "author_features"
VIEWER_AUTHOR_AFFINITY = "viewer_author_affinity"
VIEWER_CONTENT_AFFINITY = "viewer_content_affinity"
STORIES_BY_AUTHOR = "stories_by_author"
STORY_VIEWS = "story_views"
STORIES_SEEN_BY_VIEWER = "stories_seen_by_viewer"
RANKED_FEEDS = "ranked_feeds"
STORY_EXPIRY_INDEX = "story_expiry_index"  # 0003_stories.cql
STORIES_BY_ID = "stories_by_id"  # 0003_stories.cql
STORY_DELETIONS = "story_deletions"  # 0004_story_deletions.cql
FOLLOWED_CELEBRITIES = "followed_celebrities"  # 0005_followed_celebrities.cql

TABLES: tuple[str, ...] = (
    FOLLOWERS_BY_USER, FOLLOWING_BY_USER, FOLLOWER_COUNTS, POSTS, HOME_FEED_BY_USER,
    AUTHOR_TIMELINE, USER_ACTIVITY, POST_FEATURES, AUTHOR_FEATURES, VIEWER_AUTHOR_AFFINITY,
    VIEWER_CONTENT_AFFINITY, STORIES_BY_AUTHOR, STORY_VIEWS, STORIES_SEEN_BY_VIEWER,
    RANKED_FEEDS, STORY_EXPIRY_INDEX, STORIES_BY_ID, STORY_DELETIONS, FOLLOWED_CELEBRITIES,
)

#: Width of a feed/timeline partition: one week of ``created_at`` (epoch weeks).
FEED_BUCKET_MS = 7 * 24 * 3600 * 1000

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.cql$")


def time_bucket(time_ms: int) -> int:
    """Partition bucket of a post created at ``time_ms`` (ms since the epoch)."""
    return time_ms // FEED_BUCKET_MS


def buckets_back(now_ms: int, count: int) -> list[int]:
    """The ``count`` newest buckets up to ``now_ms``, newest first (for feed reads)."""
    newest = time_bucket(now_ms)
    return [newest - i for i in range(count)]


def event_timestamp_us(event_time_ms: int) -> int:
    """The ``USING TIMESTAMP`` value for an event time: latest event time wins."""
    return event_time_ms * 1000


def check_keyspace_name(keyspace: str) -> str:
    """``keyspace`` if it is a plain lower-case CQL identifier, else ``ValueError``."""
    if not _IDENTIFIER.match(keyspace):
        raise ValueError(
            f"bad keyspace name {keyspace!r}: use lower-case letters, digits and _, "
            "starting with a letter, at most 48 characters")
    return keyspace


# --------------------------------------------------------------------------- migrations


class MigrationError(Exception):
    """The migrations cannot be applied as they are (message says why)."""


@dataclasses.dataclass(frozen=True)
class Migration:
    """One numbered ``.cql`` file."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def statements(self) -> list[str]:
        return split_statements(self.text)


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    version: int
    name: str
    status: str  # "applied" or "already_applied"


def load_migrations(directory: Path = CQL_DIR) -> list[Migration]:
    """The migration files of ``directory``, by version; duplicate versions are an error."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.cql")):
        m = _MIGRATION_FILE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.cql")
        version = int(m["version"])
        if version in migrations:
            raise MigrationError(f"two migrations with version {version}")
        migrations[version] = Migration(version, m["name"], path.read_text(encoding="utf-8"))
    return [migrations[v] for v in sorted(migrations)]


def split_statements(text: str) -> list[str]:
    """CQL statements of ``text``, split on ``;`` outside quotes and comments.

    ``--`` and ``//`` line comments and ``/* */`` block comments are dropped.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        two = text[i:i + 2]
        if two in ("--", "//"):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif two == "/*":
            end = text.find("*/", i + 2)
            if end < 0:
                raise MigrationError("unterminated /* comment")
            i = end + 2
        elif c in ("'", '"'):
            j = i + 1
            while True:
                j = text.find(c, j)
                if j < 0:
                    raise MigrationError(f"unterminated {c} quote")
                if text[j + 1:j + 2] == c:  # doubled quote escapes itself
                    j += 2
                    continue
                break
            current.append(text[i:j + 1])
            i = j + 1
        elif c == ";":
            stmt = "".join(current).strip()
            if stmt:
                statements.append(stmt)
            current = []
            i += 1
        else:
            current.append(c)
            i += 1
    tail = "".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


