"""The embedded Milvus Lite server's row reads (``workers.index_server``): the same rows as
Milvus Lite's own ``Segment.row_to_dict``, read from real segments (Parquet files)."""

from __future__ import annotations

import gc
import json

import milvus_lite
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from milvus_lite.storage.segment import Segment

from workers import index_server

ORIGINAL = Segment.row_to_dict  # as Milvus Lite ships it (nothing in this process installs the patch)


def _segment(tmp_path, n: int = 7, nullable: bool = False, meta: bool = True) -> Segment:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((n, 4)).astype(np.float32)
    vector_values = [None if nullable and i % 3 == 1 else v.tolist() for i, v in enumerate(vectors)]
    table = pa.table({
        "item_id": pa.array([f"i{i}" for i in range(n)]),
        "vector": pa.array(vector_values, type=pa.list_(pa.float32(), 4)),
        "title": pa.array([f"Title ü {i}" if i % 4 else None for i in range(n)]),
        "scenes": pa.array([["tv", "web"][: i % 3] for i in range(n)], type=pa.list_(pa.string())),
        "available": pa.array([i % 2 == 0 for i in range(n)]),
        "ts": pa.array([i / 3 for i in range(n)], type=pa.float64()),
        "no": pa.array(range(100, 100 + n), type=pa.int64()),
        "raw": pa.array([bytes([i, 255]) for i in range(n)], type=pa.binary()),
        "$meta": pa.array([json.dumps({"extra": i, "tag": "x"}) if i % 2 else None for i in range(n)]),
        "_seq": pa.array(range(n), type=pa.uint64()),
    })
    if not meta:
        table = table.drop_columns(["$meta"])
    path = tmp_path / "data_000001_000007.parquet"
    pq.write_table(table, path)
    return Segment.load(str(path), "_default", "item_id", "vector")


@pytest.mark.parametrize("nullable", [False, True])
def test_rows_equal_milvus_lites_own(tmp_path, nullable):
    seg = _segment(tmp_path, nullable=nullable)
    for row in [*range(len(seg.pks)), 3, 0]:  # again after every column is converted
        want = ORIGINAL(seg, row)
        got = index_server.fast_row_to_dict(seg, row)
        assert got == want and list(got) == list(want)
        assert all(type(got[k]) is type(want[k]) for k in want)
    assert ORIGINAL(seg, 1)["extra"] == 1 and ORIGINAL(seg, 0)["vector"] is not None  # $meta unpacked, a vector read
    if nullable:
        assert index_server.fast_row_to_dict(seg, 1)["vector"] is None


def test_columns_are_converted_once_per_table_and_let_go_with_it(tmp_path):
    gc.collect()
    before = len(index_server._columns)
    seg = _segment(tmp_path)
    index_server.fast_row_to_dict(seg, 2)
    readers = index_server._columns[id(seg.table)][1]
    assert readers["no"] == ("list", list(range(100, 107)))
    assert readers["vector"][0] == "vector" and readers["raw"] == ("one", None)
    index_server.fast_row_to_dict(seg, 4)
    assert index_server._columns[id(seg.table)][1] is readers
    del seg, readers
    gc.collect()
    assert len(index_server._columns) == before


def test_a_search_reads_of_each_hit_only_the_key_and_the_fields_it_returns(tmp_path):
    """Within a search (and only there), a hit's row holds the primary key and the output fields,
    with the values of the whole row; a collection with dynamic fields is read whole."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, dynamic = _segment(tmp_path / "a", meta=False), _segment(tmp_path / "b")
    seen = []

    def search(**kw):  # stands for Milvus Lite's executor: reads rows of hits
        seen.append([index_server.fast_row_to_dict(seg, 3) for seg in (plain, dynamic)])
        return "hits"

    execute = index_server.only_returned_fields(search)
    assert execute(output_fields=["no", "title"], pk_field="item_id") == "hits"
    (narrow, whole), = seen
    assert narrow == {k: v for k, v in ORIGINAL(plain, 3).items() if k in ("item_id", "no", "title")}
    assert whole == ORIGINAL(dynamic, 3)
    assert index_server.fast_row_to_dict(plain, 3) == ORIGINAL(plain, 3)  # outside a search: every field
    execute(output_fields=None, pk_field="item_id")
    assert seen[-1][0] == ORIGINAL(plain, 3)


def test_installed_only_on_the_version_it_was_written_for(monkeypatch):
    from milvus_lite.engine import collection

    monkeypatch.setattr(Segment, "row_to_dict", ORIGINAL)  # restored after the test
    monkeypatch.setattr(collection, "execute_search_with_index", collection.execute_search_with_index)
    monkeypatch.setattr(milvus_lite, "__version__", "9.9.9")
    assert index_server.install() is False and Segment.row_to_dict is ORIGINAL
    monkeypatch.setattr(milvus_lite, "__version__", index_server.PATCHED_VERSION)
    assert index_server.install() is True and Segment.row_to_dict is index_server.fast_row_to_dict
