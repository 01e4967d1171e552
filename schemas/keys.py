"""The Redis key layout, defined once for the pipelines (writers) and serving (readers).

Every key is ``<prefix>:<kind>:{<tag>}[:<sub>]``: the prefix (default ``fb``)
isolates deployments and tests; the hash tag (``{u:<user_id>}``,
``{p:<post_id>}``, ``{s:<story_id>}``) keeps the keys of one user, post or story
in one Redis Cluster slot. Times are ms since the epoch, ids decimal strings.
Why this layout: docs/architecture.md, "Redis key layout".
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Iterable

from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES


def layout_tag(names: tuple[str, ...]) -> str:
    """A short name of a feature layout (its names in order) for the keys holding it."""
    return f"{zlib.crc32(','.join(names).encode()):08x}"


_POST_TAG, _AUTHOR_TAG = layout_tag(POST_FEATURES), layout_tag(AUTHOR_FEATURES)
_MEDIA_TAG = layout_tag(MEDIA_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyLayout:
    """Key names under ``prefix``; methods return ``str`` keys."""

    prefix: str = "fb"

    def __post_init__(self):
        if not self.prefix or any(c in self.prefix for c in "{}: \t\n*?[]"):
            raise ValueError(f"bad Redis key prefix {self.prefix!r}")

    def pattern(self) -> str:
        """Glob matching every key of this layout (for SCAN in tools and tests)."""
        return f"{self.prefix}:*"

    # -- feeds -----------------------------------------------------------------

    def home_feed(self, user_id: int) -> str:
        """ZSET: pushed posts of ``user_id``'s home feed; member post_id, score created_at ms.

        Capped (ZREMRANGEBYRANK) to the newest N entries; ZADD is idempotent,
        so a re-delivered post never appears twice.
        """
        return f"{self.prefix}:feed:{{u:{user_id}}}"

    def home_feeds(self, user_ids: Iterable[int]) -> list[str]:
        """``[home_feed(u) for u in user_ids]``, without a method call per user (the
        fan-out builds one per feed insert)."""
        head = f"{self.prefix}:feed:{{u:"
        return [f"{head}{u}}}" for u in user_ids]

    def home_feed_staging(self, user_id: int) -> str:
        """ZSET: a feed being rebuilt, RENAMEd onto ``home_feed`` when complete."""
        return f"{self.prefix}:feed_tmp:{{u:{user_id}}}"

    def author_timeline(self, author_id: int) -> str:
        """ZSET: recent posts by ``author_id`` (pulled for celebrities); member post_id, score created_at ms."""
        return f"{self.prefix}:timeline:{{u:{author_id}}}"

    def timeline_deleted(self, author_id: int) -> str:
        """ZSET: posts deleted from ``author_id``'s timeline, newest ``timeline_cap`` kept;
        member post_id, score created_at ms.

        A delete moves the post from ``author_timeline`` to here in one MULTI
        (same tag), and an unfollow reads both in one MULTI: whichever runs
        first, the unfollow sees the post and takes it out of the ex-follower's
        feed, even when the delete no longer saw that follower.
        """
        return f"{self.prefix}:timeline_del:{{u:{author_id}}}"

    def ranked_feed(self, user_id: int) -> str:
        """STRING: ``user_id``'s ranked feed, a head (generated_at, model version) and a
        fixed-size record per entry in rank order (``stores.ranked``), replaced
        as a whole by one script."""
        return f"{self.prefix}:ranked:{{u:{user_id}}}"

    def ranked_feed_previous(self, user_id: int) -> str:
        """STRING: the ranked feed replaced by the latest write, kept a few minutes so a
        reader paging through it can finish."""
        return f"{self.prefix}:ranked_prev:{{u:{user_id}}}"

    def ranked_meta(self, user_id: int) -> str:
        """HASH of the layout before one string per ranked feed (its ZSET held the ranks,
        this the scores): no longer written; the swap deletes it where found."""
        return f"{self.prefix}:ranked_meta:{{u:{user_id}}}"

    def carried_posts(self, user_id: int) -> str:
        """HASH: new posts ``user_id``'s last ranking had only from their triggers (the
        fan-out had not stored them); post_id -> ``author_id:created_at:media_type``.
        Its next rankings take them as candidates too; a TTL bounds it."""
        return f"{self.prefix}:carried:{{u:{user_id}}}"

    def last_read(self, user_id: int) -> str:
        """STRING: when ``user_id`` last read a feed (ms); absent or old means inactive."""
        return f"{self.prefix}:last_read:{{u:{user_id}}}"

    def last_reads(self, user_ids: Iterable[int]) -> list[str]:
        """``[last_read(u) for u in user_ids]``, without a method call per user."""
        head = f"{self.prefix}:last_read:{{u:"
        return [f"{head}{u}}}" for u in user_ids]

    # -- posts and graph -------------------------------------------------------

    def post(self, post_id: int) -> str:
        """HASH: post metadata: author_id, created_at, media_type, caption_length,
        hashtags (JSON list), event_time; a tombstone keeps only author_id,
        created_at, ``deleted`` = 1 and ``deleted_at`` (never removed, so a
        replayed create cannot resurrect the post)."""
        return f"{self.prefix}:post:{{p:{post_id}}}"

    def followers(self, user_id: int) -> str:
        """ZSET: follower ids of ``user_id``; score = event time (ms) of the follow.

        Ascending order is "oldest follower first". The durable copy is in Cassandra.
        """
        return f"{self.prefix}:followers:{{u:{user_id}}}"

    def following(self, user_id: int) -> str:
        """ZSET: ids of the users ``user_id`` follows (to pull celebrity timelines); score = follow time ms."""
        return f"{self.prefix}:following:{{u:{user_id}}}"

    def follower_edges(self, user_id: int) -> str:
        """HASH: newer-wins state of the edges *into* ``user_id``: field = follower_id,
        value = edge version (``event_time * 2 + is_unfollow``) of the last applied event.

        Lives beside ``followers`` (same tag) so one Lua script checks and applies.
        """
        return f"{self.prefix}:edges_in:{{u:{user_id}}}"

    def following_edges(self, user_id: int) -> str:
        """HASH: the same edge versions seen from the follower: field = followee_id."""
        return f"{self.prefix}:edges_out:{{u:{user_id}}}"

    def followed_celebrities(self, user_id: int) -> str:
        """ZSET: the accounts ``user_id`` follows that are at or above the push threshold
        (pulled at read time, not pushed); member followee id, score follow time ms.

        Kept by the fan-out on follow and unfollow and when a followee crosses the
        threshold either way (``celebrity``), so a reader finds the timelines to
        pull in one command instead of scanning ``following``. The durable copy
        is the ``followed_celebrities`` table.
        """
        return f"{self.prefix}:celebs:{{u:{user_id}}}"

    def celebrity(self, user_id: int) -> str:
        """STRING: ``1`` while ``user_id`` has at least the push threshold of followers, as
        of the last edge event applied to it (absent below); ``+`` / ``-`` while a
        crossing up / down is pending. The fan-out sets ``+`` / ``-`` in the script that
        applies the edge, updates every follower's ``followed_celebrities`` and the
        durable copy, then settles it (``1`` / absent)."""
        return f"{self.prefix}:celeb:{{u:{user_id}}}"

    def top_followers(self, user_id: int) -> str:
        """ZSET: engagement of followers with ``user_id``; member follower_id, score higher = more engaged.

        Read filtered by current membership of ``followers`` (same tag, one Lua call).
        """
        return f"{self.prefix}:top_followers:{{u:{user_id}}}"

    def top_followers_stamps(self, user_id: int) -> str:
        """HASH: newer-wins state of ``top_followers``: field = follower_id, value = write
        stamp of the affinity its score came from (the features pipeline's replays never
        roll a score back)."""
        return f"{self.prefix}:top_followers_at:{{u:{user_id}}}"

    # -- features (online copy, with TTLs) -------------------------------------

    def post_features(self, post_id: int) -> str:
        """STRING: features of a post, a 16-byte slot (value, write stamp) per name of
        ``POST_FEATURES`` (``stores.redis.slots``; read and written by
        ``OnlineFeatureStore``). The key names the layout (``layout_tag``), so a
        change to the names starts new keys. (Before 2026-12-06 a hash at
        ``feat:post``.)"""
        return f"{self.prefix}:feat:post.{_POST_TAG}:{{p:{post_id}}}"

    def author_features(self, author_id: int) -> str:
        """STRING: features of an author, a slot per name of ``AUTHOR_FEATURES`` (as
        ``post_features``)."""
        return f"{self.prefix}:feat:author.{_AUTHOR_TAG}:{{u:{author_id}}}"

    def author_affinity(self, viewer_id: int) -> str:
        """STRING: the viewer's author affinities, 24-byte records sorted by author (author,
        score decayed to its valid_at, write stamp; ``stores.redis.affinities``): one GET
        per viewer of a ranking batch. (Before 2026-12-06 a hash at ``feat:aff_author``.)"""
        return f"{self.prefix}:feat:aff_authors:{{u:{viewer_id}}}"

    def content_affinity(self, viewer_id: int) -> str:
        """STRING: the viewer's affinity per media type, a slot per name of ``MEDIA_TYPES``
        (as ``post_features``). (Before 2026-12-06 a hash at ``feat:aff_media``.)"""
        return f"{self.prefix}:feat:aff_media.{_MEDIA_TAG}:{{u:{viewer_id}}}"

    # -- social facts (the online side of domain.social_features) --------------

    def post_engagers(self, post_id: int) -> str:
        """ZSET: who first engaged with ``post_id`` (a like, comment, share or save) and
        when; member viewer_id, score the earliest event time ms seen (a replayed or
        late event never makes it later)."""
        return f"{self.prefix}:social:eng:{{p:{post_id}}}"

    def post_viewers(self, post_id: int) -> str:
        """ZSET: who first viewed ``post_id`` and when, kept like ``post_engagers``."""
        return f"{self.prefix}:social:view:{{p:{post_id}}}"

    def author_social(self, author_id: int) -> str:
        """HASH: decayed sums of first engagements (``e``) and first views (``v``) with
        ``author_id``'s posts, both as of ``at`` (ms)."""
        return f"{self.prefix}:social:author:{{u:{author_id}}}"

    def viewer_social(self, viewer_id: int) -> str:
        """HASH: ``viewer_id``'s decayed first engagements per author; field author_id,
        value ``<sum>@<as of ms>`` (grouped into communities when read)."""
        return f"{self.prefix}:social:viewer:{{u:{viewer_id}}}"

    def social_totals(self) -> str:
        """HASH: everyone's first engagements (``engaged``) and first views (``views``)."""
        return f"{self.prefix}:social:totals"

    # -- stories ---------------------------------------------------------------

    def author_stories(self, author_id: int) -> str:
        """ZSET: stories of ``author_id``; member story_id, score expires_at ms.

        Readers take ``ZRANGEBYSCORE key (now +inf`` so expired stories are
        never served, whatever the expiry pipeline's lag.
        """
        return f"{self.prefix}:stories:{{u:{author_id}}}"

    def story(self, story_id: int) -> str:
        """HASH: story metadata: author_id, created_at, expires_at, media_type, views
        (unique viewers). After a delete or expiry, a tombstone: author_id,
        expires_at and ``removed`` (``deleted``/``expired``) until expires_at + grace."""
        return f"{self.prefix}:story:{{s:{story_id}}}"

    def story_viewers(self, story_id: int) -> str:
        """SET: viewer ids who saw ``story_id`` (SCARD = unique views); EXPIREAT the story's
        expiry + grace."""
        return f"{self.prefix}:story_viewers:{{s:{story_id}}}"

    def seen_stories(self, viewer_id: int) -> str:
        """ZSET: stories ``viewer_id`` has seen; member story_id, score expires_at ms.

        Scored by expiry so ``ZREMRANGEBYSCORE -inf now`` trims it.
        """
        return f"{self.prefix}:seen:{{u:{viewer_id}}}"

    # -- meta ------------------------------------------------------------------

    def generation(self) -> str:
        """STRING: the generation of this prefix's data, a token written each time Redis
        was filled from Cassandra (``feedbeam rebuild``, or a job's restore after a
        loss). Absent: Redis lost its data (or never had any), and jobs restore
        before they apply. Outside any hash tag: read on its own, never inside a script.
        """
        return f"{self.prefix}:meta:generation"

    def deleted_posts(self) -> str:
        """STREAM: the posts the fan-out deleted, one entry per batch (field ``posts``:
        their ids, comma-separated), added after their tombstones and trimmed to
        about ``stores.redis.feeds.DELETION_LOG_ENTRIES``. Serving workers follow it
        to drop deleted posts from the metadata they cache
        (``serving.logic.DeletionFollower``). Outside any hash tag."""
        return f"{self.prefix}:meta:deleted_posts"

    def unfollowed(self, user_id: int) -> str:
        """STRING: a number that grows with every unfollow applied to ``user_id`` (the
        fan-out's ``_EDGES_IN``), so a push that read it with the followers and reads it
        again after writing knows whether an unfollow may have raced it. Starts at the
        server's time in microseconds when absent and expires a day after the last
        unfollow, so a value never comes back once gone. Bookkeeping, not data: under
        ``meta``, with ``user_id``'s hash tag (read in the script that reads the
        followers)."""
        return f"{self.prefix}:meta:unfollowed:{{u:{user_id}}}"

    def restore_lock(self) -> str:
        """STRING: held (SET NX PX, value = the holder's token) by the one job restoring
        this prefix from Cassandra; the others wait for ``generation``."""
        return f"{self.prefix}:meta:restore_lock"

    def meta_pattern(self) -> str:
        """Glob of the meta keys (``generation``, ``restore_lock``, ``deleted_posts``):
        not views."""
        return f"{self.prefix}:meta:*"

    # -- dedup -----------------------------------------------------------------

    def dedup(self, scope: str, event_id: str) -> str:
        """STRING: marker that ``event_id`` was applied in ``scope`` (SET NX EX <window>)."""
        return f"{self.prefix}:dedup:{scope}:{event_id}"
