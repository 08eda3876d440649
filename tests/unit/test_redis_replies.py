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


def test_a_joined_row_reads_back_every_id_and_the_exact_counts():
    import struct

    import numpy as np

    from streams.stores.redis_profiles import _joined_row

    ids = ["caf\u00e9", "line\nbreak", "back\\slash", "\U0001f3ac", "a b"]
    counts = [2.5, 1 / 3, 1e-300, 7.0, 0.1 + 0.2]
    reply = [b"\xff".join(i.encode() for i in ids), b"".join(struct.pack("<d", c) for c in counts)]
    got_ids, got = _joined_row(reply)
    assert got_ids == ids and got.dtype == np.float64 and got.tolist() == counts
    assert _joined_row([b"", b""])[0] == [] and len(_joined_row([b"", b""])[1]) == 0
