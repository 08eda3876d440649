"""The Redis store reads sorted sets without redis-py's reply conversion: both wire shapes."""

from __future__ import annotations

from streams.stores.profiles import shard_of
from streams.stores.redis_profiles import _scored


def test_raw_zset_replies_read_the_same_on_resp3_and_resp2():
    resp3 = [[b"caf\xc3\xa9", 2.5], [b"b", 1.0]]  # pairs, scores already doubles
    resp2 = [b"caf\xc3\xa9", b"2.5", b"b", b"1"]  # members and scores alternating, as text
    assert _scored(resp3) == _scored(resp2) == [("café", 2.5), ("b", 1.0)]
    assert _scored([]) == _scored(None) == []


def test_the_remembered_shard_of_a_key_is_the_crc32_one():
    import zlib

    for key in ("item-1", "café", "", "item-1"):
        assert shard_of(key, 16) == zlib.crc32(key.encode()) % 16
        assert shard_of(key, 7) == zlib.crc32(key.encode()) % 7  # the shard count is part of the key
