"""The embedded Milvus Lite server's row reads and searches (``workers.index_server``): the same
rows as Milvus Lite's own ``Segment.row_to_dict``, read from real segments (Parquet files), and
the same hits as its own search executor, on a real in-process collection."""

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
    monkeypatch.setattr(collection, "project_record", collection.project_record)
    monkeypatch.setattr(milvus_lite, "__version__", "9.9.9")
    assert index_server.install() is False and Segment.row_to_dict is ORIGINAL
    project = collection.project_record
    monkeypatch.setattr(milvus_lite, "__version__", index_server.PATCHED_VERSION)
    assert index_server.install() is True and Segment.row_to_dict is index_server.fast_row_to_dict
    assert collection.project_record is not project and collection.execute_search_with_index.__name__ == "execute"


def _schema(dim: int, *extra):
    """The item index's fields that filters read (key, vector, category, availability, catalog
    number), and ``extra`` ones."""
    from milvus_lite.schema.types import CollectionSchema, DataType, FieldSchema

    return CollectionSchema(fields=[
        FieldSchema("item_id", DataType.VARCHAR, is_primary=True, max_length=64),
        FieldSchema("vector", DataType.FLOAT_VECTOR, dim=dim),
        FieldSchema("category", DataType.VARCHAR, max_length=64),
        FieldSchema("available", DataType.BOOL),
        FieldSchema("no", DataType.INT64),
        *extra,
    ])


def _collection(tmp_path, index: bool):
    """A real in-process Milvus Lite collection whose rows sit in two segments and the memtable,
    with keys written again (in a later segment and in the memtable) and deleted (flushed and
    not): every case of which row holds a key's newest version."""
    from milvus_lite.db import MilvusLite

    db = MilvusLite(str(tmp_path / "db"))
    col = db.create_collection("items", _schema(8))
    if index:
        col.create_index("vector", {"index_type": "FLAT", "metric_type": "IP", "params": {}})
    col.load()
    rng = np.random.default_rng(11)

    def rows(nos, salt=0):
        vec = rng.standard_normal((len(nos), 8)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        return [{"item_id": f"i{n}", "vector": v.tolist(), "category": "abc"[(n + salt) % 3],
                 "available": (n + salt) % 5 != 0, "no": n} for n, v in zip(nos, vec)]

    col.insert(rows(range(60)))
    col.flush()
    col.upsert(rows(range(0, 60, 4), salt=1))  # newer versions of some keys, in a second segment
    col.delete(["i3", "i7", "i40"])
    col.flush()
    col.upsert(rows(range(2, 60, 6), salt=2))  # newer still, unflushed
    col.insert(rows(range(60, 75)))
    col.delete(["i9", "i61", "i8"])  # deletes not yet flushed, of flushed and unflushed rows
    return db, col


@pytest.mark.parametrize("index", [False, True])
def test_a_search_finds_what_milvus_lites_own_executor_finds(tmp_path, monkeypatch, index):
    """The same hits, distances and entities as Milvus Lite's executor, for filters it evaluates
    itself and filters it leaves to Milvus Lite, over segments, the memtable and tombstones."""
    from milvus_lite.engine import collection
    from milvus_lite.search import indexed_filter

    db, col = _collection(tmp_path, index)
    assert len(col._segment_cache) == 2 and col._memtable.size() > 0
    original = collection.execute_search_with_index
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((3, 8)).astype(np.float32).tolist()
    filters = [None, "available == true", "no not in [1, 2, 4, 12, 30, 64]", 'category in ["a", "c"]',
               'available == true and (no >= 10 or category != "b")', "not (no < 20)", "no in []",
               'category like "a%"']  # the last: a filter flat_search leaves to Milvus Lite
    calls, evaluated = [], []

    def general(**kw):
        calls.append(kw)
        return original(**kw)

    def evaluate(seg, compiled, plan):
        evaluated.append(compiled.source)
        return milvus_lites(seg, compiled, plan)

    milvus_lites = indexed_filter.evaluate_segment_filter
    monkeypatch.setattr(indexed_filter, "evaluate_segment_filter", evaluate)

    try:
        for expr in filters:
            for nq, top_k in ((1, 5), (3, 200), (2, 1)):
                monkeypatch.setattr(collection, "execute_search_with_index", original)
                want = col.search(queries[:nq], top_k=top_k, expr=expr, output_fields=["no", "category"])
                monkeypatch.setattr(collection, "execute_search_with_index", index_server.flat_search(general))
                evaluated.clear()
                got = col.search(queries[:nq], top_k=top_k, expr=expr, output_fields=["no", "category"])
                assert [[h["id"] for h in q] for q in got] == [[h["id"] for h in q] for q in want], expr
                assert evaluated == ([expr] * 2 if "like" in (expr or "") else [])  # two segments; the rest by numpy
                assert [[h["entity"] for h in q] for q in got] == [[h["entity"] for h in q] for q in want]
                for g, w in zip(got, want):
                    np.testing.assert_allclose([h["distance"] for h in g], [h["distance"] for h in w], rtol=1e-6)
        everything = col.search(queries[:1], top_k=200, output_fields=["no"])[0]
        assert len(everything) == 75 - 6 and not {"i3", "i7", "i40", "i9", "i61", "i8"} & {h["id"] for h in everything}
        assert not calls  # every search was flat_search's own
    finally:
        db.close()


def test_the_filter_is_evaluated_over_numpy_columns_as_milvus_lite_evaluates_it():
    from milvus_lite.schema.types import DataType, FieldSchema
    from milvus_lite.search.filter import compile_filter, evaluate_mask

    schema = _schema(2, FieldSchema("ts", DataType.DOUBLE))
    n = 40
    table = pa.table({"item_id": [f"i{i}" for i in range(n)], "category": ["xyz"[i % 3] for i in range(n)],
                      "available": [i % 4 != 1 for i in range(n)], "no": list(range(n)),
                      "ts": [i / 7 for i in range(n)]})
    for expr in ("available == true", "available != false", "no not in [3, 5, 39]", "no in [1, 2, 100]",
                 'category == "x" or ts > 2.5', '"y" == category', "10 < no and no <= 20 and not available",
                 "ts >= 1", 'category in ["x", "z"] and no not in [0]', "no != 7", 'category not in []'):
        compiled = compile_filter(expr, schema)
        assert index_server._mask(compiled.ast, table).tolist() == evaluate_mask(compiled, table).tolist(), expr
    for expr in ('category like "x%"', "no + 1 > 3", 'item_id == "i1" and category like "x%"'):
        with pytest.raises(index_server._Unsupported):
            index_server._mask(compile_filter(expr, schema).ast, table)
    with_nulls = pa.table({"no": pa.array([1, None, 3], type=pa.int64())})
    with pytest.raises(index_server._Unsupported):  # nulls: Milvus Lite's three-valued logic decides
        index_server._mask(compile_filter("no > 1", schema).ast, with_nulls)


def test_records_are_projected_as_milvus_lite_projects_them():
    from milvus_lite.engine.projection import build_projection_plan, project_record
    from milvus_lite.schema.types import CollectionSchema, DataType, FieldSchema

    fields = [FieldSchema("item_id", DataType.VARCHAR, is_primary=True, max_length=64),
              FieldSchema("vector", DataType.FLOAT_VECTOR, dim=2), FieldSchema("no", DataType.INT64),
              FieldSchema("title", DataType.VARCHAR, max_length=64)]
    fast = index_server.fast_project_record(project_record)
    records = [{"item_id": "i1", "no": 3, "title": "t"}, {"item_id": "i1", "no": 3},
               {"item_id": "i1", "no": 3, "vector": [0.5, 0.5], "title": "t"},
               {"item_id": "i1", "no": 3, "$meta": '{"colour": "red"}'}, {"item_id": "i1", "no": 3, "colour": "red"}]
    for dynamic in (False, True):
        schema = CollectionSchema(fields=fields, enable_dynamic_field=dynamic)
        for kind in ("search", "query", "get"):
            for out in (None, ["no"], ["no", "title", "item_id"], ["*"], ["colour"] if dynamic else ["no"]):
                plan = build_projection_plan(out, schema, api_kind=kind)
                for record in records:
                    assert fast(dict(record), schema, plan) == project_record(dict(record), schema, plan), (kind, out)
