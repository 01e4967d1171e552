"""The command packer of feedbeam's Redis clients (``PlainArgsPacker``) gives the bytes
redis-py's own hiredis packer gives, and fails the same way."""
from __future__ import annotations

import pytest
import redis
from redis.connection import HiredisRespSerializer

from stores.redis.client import PlainArgsPacker

COMMANDS = [
    ("EVALSHA", "abc123", 2, "fb:f:1", b"fb:g:2", 7, -3, 2.5, "ünï"),
    ("SCRIPT LOAD", "return 1"),               # a command name of two words
    (b"CLIENT SETNAME", b"x"),
    ("ZADD", "k", 1_780_000_000_000, 42),
    ("SET", bytearray(b"k"), memoryview(b"v")),  # what only redis-py's pass handles
]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_packs_to_the_bytes_redis_py_packs_it_to(command):
    assert PlainArgsPacker().pack(*command) == HiredisRespSerializer().pack(*command)


def test_an_argument_redis_cannot_take_fails_as_with_redis_py():
    for packer in (PlainArgsPacker(), HiredisRespSerializer()):
        with pytest.raises(redis.exceptions.DataError):
            packer.pack("SET", "k", None)


def test_the_clients_use_it():
    from stores.redis.client import new_client

    client = new_client("redis://127.0.0.1:1/0")  # no connection is made
    conn = client.connection_pool.make_connection()
    assert isinstance(conn._command_packer, PlainArgsPacker)
