"""The Milvus Lite gRPC server as the embedded stack runs it: ``python -m workers.index_server
server --data-dir D --host H --port P`` takes ``python -m milvus_lite``'s arguments.

Milvus Lite 3.2.2 is Python over numpy and pyarrow. For every search hit it turns the hit's whole
stored row into Python objects through pyarrow, one value at a time, the 384-float vector
included, and then keeps only the fields asked for (``Segment.row_to_dict``). With 16 hits a query
that was half of the server's CPU. A segment is immutable (one Parquet file), so
:func:`fast_row_to_dict` reads the same values from columns converted once per segment, and the
vector from the numpy matrix the segment already holds. The rows it gives are equal to the
original's (a test compares them on a real Milvus Lite). Within a search
(:func:`only_returned_fields`) it reads only the primary key and the fields the search returns.

A search (:func:`flat_search`) paid about 16 ms of fixed cost on 9,742 items, whatever it asked:
it walked every row in Python to find which rows hold the newest version of their key, evaluated
its filter through one pyarrow scalar per listed value, and copied the valid rows' vectors before
multiplying them. Segments are immutable: the newest versions among a set of segments are found
once per set, and only the memtable's rows and the tombstones (few) are checked per search; the
filter is evaluated over numpy columns converted once per segment; distances are taken against
the whole matrix and the valid columns picked from them (rather than the valid rows' vectors
copied first), so a row's distance does not depend on which rows a filter left.

All of it is installed only on the version it was written against; on any other the server runs
as it comes.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from typing import Any, Optional

log = logging.getLogger("streamrec.index_server")

#: the Milvus Lite release whose ``Segment.row_to_dict`` :func:`fast_row_to_dict` replaces
PATCHED_VERSION = "3.2.2"

# id(table) -> (a weak reference to it, what was worked out of it so far: the readers of its
# columns by name, the names a search's hit reads by wanted fields, numpy columns by ("numpy", name))
_columns: dict[int, tuple[Any, dict[Any, Any]]] = {}
# the fields a search running in this thread returns (``wanted.fields``; None: every field)
wanted = threading.local()


def _converted(table: Any) -> dict[Any, Any]:
    """What was worked out of ``table`` so far (see ``_columns``; filled by the callers), kept
    while the table lives."""
    key = id(table)
    got = _columns.get(key)
    if got is None or got[0]() is not table:
        got = (weakref.ref(table, lambda _ref, key=key: _columns.pop(key, None)), {})
        _columns[key] = got
    return got[1]


def _reader(segment: Any, name: str) -> tuple[str, Any]:
    """How to read field ``name`` of a segment's rows: ``("vector", (matrix, valid))`` for a float
    vector the segment holds as a float32 matrix, ``("list", values)`` for a column converted
    whole, ``("one", None)`` to convert one value at a time (other vectors, raw bytes)."""
    import numpy as np
    import pyarrow as pa

    t = segment.table.column(name).type
    vector = segment._vector_data_by_field.get(name)
    if vector is not None:
        if pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type) and vector[0].dtype == np.float32:
            return "vector", vector
        return "one", None
    if pa.types.is_fixed_size_list(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "one", None
    return "list", segment.table.column(name).to_pylist()


def fast_row_to_dict(self: Any, row_idx: int) -> dict:
    """``Segment.row_to_dict`` of Milvus Lite 3.2.2, with the same result: every field of the row
    but ``_seq``, dynamic fields in ``$meta`` unpacked beside it."""
    result: dict = {}
    meta_raw = None
    readers = _converted(self.table)
    fields = getattr(wanted, "fields", None)
    names = readers.get(fields)  # the names read for these wanted fields, worked out once per table
    if names is None:
        names = self.table.schema.names
        if fields is not None and "$meta" not in names:  # a search's hit: only what it returns
            names = [name for name in names if name in fields]
        readers[fields] = names
    for name in names:
        if name == "_seq":
            continue
        how = readers.get(name)
        if how is None:
            how = readers[name] = _reader(self, name)
        kind, data = how
        if kind == "list":
            val = data[row_idx]
        elif kind == "vector":
            matrix, valid = data
            val = None if valid is not None and not valid[row_idx] else matrix[row_idx].tolist()
        else:
            val = self.table.column(name)[row_idx].as_py()
        if name == "$meta":
            meta_raw = val
        result[name] = val
    if meta_raw is not None:
        if isinstance(meta_raw, str):
            try:
                meta = json.loads(meta_raw)
            except (json.JSONDecodeError, ValueError):
                meta = None
            if isinstance(meta, dict):
                result.update(meta)
        elif isinstance(meta_raw, dict):
            result.update(meta_raw)
    return result


def only_returned_fields(search: Any) -> Any:
    """Milvus Lite's search executor, reading of each hit's row only the primary key and the
    fields the search returns (a hit's row was read whole, its vector included, and cut to those
    fields afterwards)."""
    def execute(*args: Any, **kwargs: Any) -> Any:
        out, pk = kwargs.get("output_fields"), kwargs.get("pk_field")
        if out is None or pk is None:
            return search(*args, **kwargs)
        wanted.fields = frozenset(out) | {pk}
        try:
            return search(*args, **kwargs)
        finally:
            wanted.fields = None
    return execute


class _Unsupported(Exception):
    """A filter :func:`_mask` does not evaluate; Milvus Lite's own evaluator does."""


class _Newest:
    """Which rows of a set of segments hold the newest version (the largest ``_seq``) of their key
    among those segments: worked out once per set, since segments do not change."""

    def __init__(self, segments: tuple) -> None:
        import numpy as np

        self.segments = segments
        self.seqs = [seg.seqs.tolist() for seg in segments]
        if len(segments) == 1:
            self.best: Optional[dict] = None
            self.masks = [np.ones(segments[0].num_rows, dtype=bool)]
            return
        best: dict = {}
        for seg, seqs in zip(segments, self.seqs):
            for pk, seq in zip(seg.pks, seqs):
                if seq > best.get(pk, -1):
                    best[pk] = seq
        self.best = best
        self.masks = [np.fromiter((best[pk] == seq for pk, seq in zip(seg.pks, seqs)), dtype=bool, count=len(seqs))
                      for seg, seqs in zip(segments, self.seqs)]

    def newest(self, pk: Any) -> Optional[int]:
        """The largest ``_seq`` of ``pk`` among the segments; None where none holds it."""
        if self.best is not None:
            return self.best.get(pk)
        row = self.segments[0].pk_to_row.get(pk)
        return None if row is None else self.seqs[0][row]


_newest: list = [None]  # the _Newest of the set of segments searched last


def _newest_of(segments: tuple) -> Optional[_Newest]:
    """The :class:`_Newest` of ``segments`` (kept for the next search); None where a segment holds
    a key twice, which the general path handles."""
    got = _newest[0]
    if got is not None and len(got.segments) == len(segments) and all(
            a is b for a, b in zip(got.segments, segments)):
        return got
    if any(len(seg.pk_to_row) != seg.num_rows for seg in segments):
        return None
    got = _Newest(segments)
    _newest[0] = got
    return got


def _column(table: Any, name: str) -> Any:
    """Column ``name`` of an immutable table as a numpy array (objects for strings), converted
    once and kept beside the row readers (:func:`_converted`); :class:`_Unsupported` for a column
    with nulls or a type other than numbers, booleans and strings."""
    import numpy as np
    import pyarrow as pa

    cols = _converted(table)
    key = ("numpy", name)
    if key not in cols:
        if name not in table.schema.names:
            raise _Unsupported(name)
        col = table.column(name)
        t = col.type
        if col.null_count:
            cols[key] = None
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            cols[key] = col.to_numpy()
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            cols[key] = np.array(col.to_pylist() + [None], dtype=object)[:-1]  # never a 2-D array
        else:
            cols[key] = None
    if cols[key] is None:
        raise _Unsupported(name)
    return cols[key]


_COMPARE = {"==": "__eq__", "!=": "__ne__", "<": "__lt__", "<=": "__le__", ">": "__gt__", ">=": "__ge__"}
_MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _mask(node: Any, table: Any) -> Any:
    """A filter's rows of ``table`` as a numpy boolean array, for comparisons and ``in`` lists of
    a column against literals joined by and/or/not over columns without nulls (where Milvus Lite's
    three-valued logic gives the same); :class:`_Unsupported` for anything else."""
    import numpy as np
    from milvus_lite.search.filter import ast

    if isinstance(node, ast.And):
        return np.logical_and.reduce([_mask(op, table) for op in node.operands])
    if isinstance(node, ast.Or):
        return np.logical_or.reduce([_mask(op, table) for op in node.operands])
    if isinstance(node, ast.Not):
        return ~_mask(node.operand, table)
    if isinstance(node, ast.FieldRef):  # a boolean column on its own
        col = _column(table, node.name)
        if col.dtype == bool:
            return col
    literals = (ast.IntLit, ast.FloatLit, ast.StringLit, ast.BoolLit)
    if isinstance(node, ast.InOp) and all(isinstance(e, literals) for e in node.values.elements):
        col = _column(table, node.field.name)
        values = [e.value for e in node.values.elements]
        if col.dtype == object:
            wanted = set(values)
            found = np.fromiter((v in wanted for v in col), dtype=bool, count=len(col))
        else:
            found = np.isin(col, np.array(values)) if values else np.zeros(len(col), dtype=bool)
        return ~found if node.negate else found
    if isinstance(node, ast.CmpOp):
        op, left, right = node.op, node.left, node.right
        if isinstance(left, literals) and isinstance(right, ast.FieldRef):
            op, left, right = _MIRROR[op], right, left
        if isinstance(left, ast.FieldRef) and isinstance(right, literals):
            col = _column(table, left.name)
            if (col.dtype == object) != isinstance(right, ast.StringLit):
                raise _Unsupported(op)
            out = getattr(col, _COMPARE[op])(right.value)
            if isinstance(out, np.ndarray) and out.dtype == bool and out.shape == col.shape:
                return out
    raise _Unsupported(type(node).__name__)


def _top(vectors: Any, queries: Any, top_k: int, valid: Any, metric: str) -> tuple[Any, Any]:
    """``BruteForceIndex.search``'s answer: the ``top_k`` valid rows nearest each query (local
    ids, -1 past the last; distances, +inf there), ascending. Distances are taken against every
    row and the valid columns picked, so that a row's distance does not depend on the mask."""
    import numpy as np
    from milvus_lite.search.distance import compute_distances

    nq = len(queries)
    ids = np.full((nq, top_k), -1, dtype=np.int64)
    dists = np.full((nq, top_k), np.inf, dtype=np.float32)
    if len(vectors) == 0 or top_k <= 0:
        return ids, dists
    rows = np.arange(len(vectors)) if valid is None else np.flatnonzero(valid)
    if rows.size == 0:
        return ids, dists
    # by inner product, rows times queries: the same values as Milvus Lite's queries times rows
    # (the negated products), at two thirds of the time
    d = -(vectors @ queries.T).T if metric == "IP" else compute_distances(queries, vectors, metric)
    if valid is not None:
        d = d[:, rows]
    k = min(top_k, rows.size)
    part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < rows.size else np.broadcast_to(np.arange(k), (nq, k))
    best = np.take_along_axis(d, part, axis=1)
    order = np.argsort(best, axis=1)
    ids[:, :k] = rows[np.take_along_axis(part, order, axis=1)]
    dists[:, :k] = np.take_along_axis(best, order, axis=1)
    return ids, dists


def flat_search(search: Any) -> Any:
    """Milvus Lite's search executor (``execute_search_with_index``) with the same answer, at a
    small fixed cost: see the module's docstring. Searches it does not cover (partitions, a
    segment holding a key twice, an index other than the flat one, no projection of the hits,
    which ``Collection.search`` always passes) go to ``search``."""
    def execute(query_vectors: Any, segments: Any, memtable: Any, delta_index: Any, top_k: int, metric_type: str,
                pk_field: str, vector_field: str, partition_names: Any = None, compiled_filter: Any = None,
                output_fields: Any = None, indexed_filter_plan: Any = None, project_record_fn: Any = None,
                search_params: Any = None) -> Any:
        import numpy as np
        from milvus_lite.index.brute_force import BruteForceIndex
        from milvus_lite.search.filter import evaluate_mask
        from milvus_lite.search.indexed_filter import evaluate_segment_filter

        segments = tuple(segments)
        general = dict(query_vectors=query_vectors, segments=segments, memtable=memtable, delta_index=delta_index,
                       top_k=top_k, metric_type=metric_type, pk_field=pk_field, vector_field=vector_field,
                       partition_names=partition_names, compiled_filter=compiled_filter, output_fields=output_fields,
                       indexed_filter_plan=indexed_filter_plan, project_record_fn=project_record_fn,
                       search_params=search_params)
        if query_vectors.ndim == 1:
            query_vectors = query_vectors.reshape(1, -1)
        query_vectors = query_vectors.astype(np.float32, copy=False)
        nq = int(query_vectors.shape[0])
        deletes = getattr(delta_index, "_map", None)
        segs = tuple(s for s in segments if s.num_rows > 0)
        flat = all(type(s.indexes.get(vector_field, None)) in (type(None), BruteForceIndex) for s in segs)
        if partition_names or deletes is None or not flat or project_record_fn is None:
            return search(**general)
        if nq == 0 or top_k <= 0:
            return [[] for _ in range(nq)]
        state = _newest_of(segs) if segs else None
        if segs and state is None:
            return search(**general)
        mt_pks, mt_seqs, mt_vecs, mt_row_refs, mt_table = memtable.to_search_snapshot(
            vector_field=vector_field, partition_names=None, include_table=compiled_filter is not None)
        if not segs and not mt_pks:
            return [[] for _ in range(nq)]

        # which rows hold the newest version of their key and no later delete shadows
        masks = list(state.masks) if state else []
        copied: set[int] = set()

        def drop(s: int, row: int) -> None:
            if s not in copied:
                masks[s] = masks[s].copy()
                copied.add(s)
            masks[s][row] = False

        mt_seq = [int(x) for x in mt_seqs.tolist()]
        mt_mask = np.ones(len(mt_pks), dtype=bool)
        for j, (pk, seq) in enumerate(zip(mt_pks, mt_seq)):
            newest = state.newest(pk) if state else None
            if newest is None or newest == seq:
                continue
            if newest > seq:
                mt_mask[j] = False
            else:
                for s, seg in enumerate(segs):
                    row = seg.pk_to_row.get(pk)
                    if row is not None and masks[s][row]:
                        drop(s, row)
        mt_deletes = memtable.delete_index_snapshot()
        tombstones = [*deletes.items(), *((pk, entry[0]) for pk, entry in mt_deletes.items())]
        if tombstones:
            mt_row = {pk: j for j, pk in enumerate(mt_pks)}
            for pk, deleted in tombstones:
                for s, seg in enumerate(segs):
                    row = seg.pk_to_row.get(pk)
                    if row is not None and masks[s][row] and deleted > state.seqs[s][row]:
                        drop(s, row)
                j = mt_row.get(pk)
                if j is not None and deleted > mt_seq[j]:
                    mt_mask[j] = False

        found: list[tuple[Any, Any, int]] = []  # (local ids, distances, source) of each source searched
        sources: list[Any] = []

        def recall(source: int, vectors: Any, valid: Any, index: Any) -> None:
            if not valid.any():
                return
            valid = None if valid.all() else valid
            if index is None or type(index) is BruteForceIndex:
                ids, dists = _top(vectors if index is None else index._vectors, query_vectors, top_k, valid,
                                  metric_type if index is None else index.metric)
            else:
                ids, dists = index.search(query_vectors, top_k, valid_mask=valid, params=search_params)
            found.append((ids, dists, source))

        for s, seg in enumerate(segs):
            valid = masks[s]
            if compiled_filter is not None:
                if indexed_filter_plan is None:
                    try:
                        valid = valid & _mask(compiled_filter.ast, seg.table)
                    except _Unsupported:
                        valid = valid & evaluate_segment_filter(seg, compiled_filter, None)
                else:
                    valid = valid & evaluate_segment_filter(seg, compiled_filter, indexed_filter_plan)
            vectors, present = seg.vector_data(vector_field)
            if present is not None:
                valid = valid & present
            sources.append(seg.pks)
            recall(s, vectors, valid, seg.indexes.get(vector_field))
        if mt_pks:
            valid = mt_mask
            if compiled_filter is not None and mt_table is not None:
                valid = valid & evaluate_mask(compiled_filter, mt_table).astype(bool)
            sources.append(mt_pks)
            recall(len(segs), mt_vecs, valid, None)

        results = []
        if found:
            lids = np.concatenate([ids for ids, _, _ in found], axis=1)
            dists = np.concatenate([d for _, d, _ in found], axis=1)
            srcs = np.concatenate([np.full(ids.shape[1], src) for ids, _, src in found])
        for q in range(nq if found else 0):
            # every source's hits by (distance, source, local id), as Milvus Lite merges them
            keep = np.flatnonzero(lids[q] >= 0)
            order = keep[np.lexsort((lids[q][keep], srcs[keep], dists[q][keep]))][:top_k]
            hits = []
            for dist, source, lid in zip(dists[q][order].tolist(), srcs[order].tolist(), lids[q][order].tolist()):
                if source < len(segs):
                    record = segs[source].row_to_dict(lid)
                else:
                    record = memtable.materialize_row(*mt_row_refs[lid])
                pk = record[pk_field] if pk_field in record else sources[source][lid]
                hits.append({"id": pk, "distance": dist, "entity": project_record_fn(record)})
            results.append(hits)
        results += [[] for _ in range(nq - len(results))]
        return results
    return execute


def fast_project_record(project: Any) -> Any:
    """Milvus Lite's ``project_record`` with the same result, without its per-record work on
    dynamic fields where a record has none (every key a schema field, no ``$meta``)."""
    def run(record: dict, schema: Any, plan: Any) -> dict:
        if "$meta" in record or not {f.name for f in schema.fields}.issuperset(record):
            return project(record, schema, plan)
        primary = {f.name for f in schema.fields if f.is_primary}
        search = plan.api_kind == "search"
        result = {name: record[name] for name in plan.response_schema_fields
                  if name in record and not (search and name in primary)}
        if not search:
            pk_name = next(f.name for f in schema.fields if f.is_primary)
            if pk_name in record:
                result[pk_name] = record[pk_name]
        return result
    return run


def install() -> bool:
    """Put :func:`fast_row_to_dict`, :func:`only_returned_fields`, :func:`flat_search` and
    :func:`fast_project_record` in place on Milvus Lite :data:`PATCHED_VERSION`; False (and
    Milvus Lite left as it is) on another version."""
    import milvus_lite
    from milvus_lite.storage import segment

    version = getattr(milvus_lite, "__version__", None)
    if version != PATCHED_VERSION:
        log.warning("Milvus Lite %s, not %s: its row reads are left as they are", version, PATCHED_VERSION)
        return False
    from milvus_lite.engine import collection

    segment.Segment.row_to_dict = fast_row_to_dict
    collection.execute_search_with_index = only_returned_fields(flat_search(collection.execute_search_with_index))
    collection.project_record = fast_project_record(collection.project_record)
    return True


def main(argv: list[str]) -> int:
    install()
    from milvus_lite.cmdline import main as milvus_main

    return milvus_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
