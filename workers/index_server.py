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
Both are installed only on the version they were written against; on any other the server runs
as it comes.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from typing import Any

log = logging.getLogger("streamrec.index_server")

#: the Milvus Lite release whose ``Segment.row_to_dict`` :func:`fast_row_to_dict` replaces
PATCHED_VERSION = "3.2.2"

# id(table) -> (a weak reference to it, the readers of its columns made so far, by name)
_columns: dict[int, tuple[Any, dict[str, Any]]] = {}
# the fields a search running in this thread returns (``wanted.fields``; None: every field)
wanted = threading.local()


def _converted(table: Any) -> dict[str, Any]:
    """The readers of ``table``'s columns made so far, by name (:func:`_reader`; filled by the
    caller), kept while the table lives."""
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
    names = self.table.schema.names
    fields = getattr(wanted, "fields", None)
    if fields is not None and "$meta" not in names:  # a search's hit: only what it returns
        names = [name for name in names if name in fields]
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


def install() -> bool:
    """Put :func:`fast_row_to_dict` and :func:`only_returned_fields` in place on Milvus Lite
    :data:`PATCHED_VERSION`; False (and Milvus Lite left as it is) on another version."""
    import milvus_lite
    from milvus_lite.storage import segment

    version = getattr(milvus_lite, "__version__", None)
    if version != PATCHED_VERSION:
        log.warning("Milvus Lite %s, not %s: its row reads are left as they are", version, PATCHED_VERSION)
        return False
    from milvus_lite.engine import collection

    segment.Segment.row_to_dict = fast_row_to_dict
    collection.execute_search_with_index = only_returned_fields(collection.execute_search_with_index)
    return True


def main(argv: list[str]) -> int:
    install()
    from milvus_lite.cmdline import main as milvus_main

    return milvus_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
