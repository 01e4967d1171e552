"""Event builders shared by the fan-out tests: short names for readable scenarios."""
from __future__ import annotations

from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind

F, U = FollowKind.FOLLOW, FollowKind.UNFOLLOW


def follow(follower, followee, t, kind=F):
    return FollowEvent(f"{kind.value}-{follower}-{followee}-{t}", t, kind, follower, followee)


def create(pid, author, t):
    return PostEvent(f"c{pid}", t, PostEventKind.CREATED, pid, author, t, MediaType.PHOTO)


def delete(pid, author, created, t):
    return PostEvent(f"d{pid}", t, PostEventKind.DELETED, pid, author, created, MediaType.PHOTO)
