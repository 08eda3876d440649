"""The Milvus item index (Milvus standalone or cluster by URI and token; Milvus Lite by a ``.db``
path or its gRPC server)."""

from __future__ import annotations

import json
from typing import Callable, Collection, Sequence, TypeVar

import numpy as np

from models.ranking import Candidate
from streams.stores.items import EncoderMismatch, ItemIndex, ItemRow

T = TypeVar("T")
_OUT = ["title", "category", "scenes", "vector", "available", "no"]
MAX_SCENES = 64
ENCODER_PROPERTY = "streamrec.encoder"  # the collection property naming the encoder of its vectors
# pymilvus pings every 10 s even on idle connections; gRPC servers with default policies (the
# Milvus Lite server among them) answer an idle connection's pings with GOAWAY "too_many_pings",
# and a later client for the same URI then fails to reconnect. Ping only while calls are running.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 60_000, "grpc.keepalive_permit_without_calls": False}
# Build parameters of each vector index (a Milvus server refuses HNSW without them), and the search
# breadth of HNSW: ``ef`` at least the results asked for (Milvus's rule) and at least 64.
INDEX_PARAMS = {"FLAT": {}, "AUTOINDEX": {}, "HNSW": {"M": 16, "efConstruction": 200}}
# The metric of new collections. Item and query vectors are unit vectors (the encoder's output, the
# profile's normalised mix), so their inner product is their cosine; Milvus Lite's flat search by
# IP takes about half the CPU of one by COSINE, which normalises every vector again. Collections
# made with COSINE keep it.
METRIC = "IP"
HNSW_MIN_EF = 64


def milvus_client(uri: str, token: str = "", timeout: float | None = None):
    """A ``MilvusClient`` with the keepalive settings above."""
    from pymilvus import MilvusClient

    return MilvusClient(uri=uri, token=token, timeout=timeout, grpc_options=dict(GRPC_OPTIONS))


class MilvusItemIndex(ItemIndex):
    """One collection: ``item_id`` (primary key), ``vector`` (unit vectors by inner product, ``index_type``), title, category, scenes,
    availability and timestamp. The collection is created on first use and records ``encoder`` in
    its properties; one of another dimension or encoder is an error (vectors of two encoders must
    never be mixed)."""

    def __init__(self, uri: str, dim: int, collection: str, token: str = "", consistency: str = "Strong",
                 index_type: str = "FLAT", flush_writes: bool = True, timeout_s: float = 30.0,
                 encoder: str = "") -> None:
        self.uri = uri
        self.dim = dim
        self.encoder = encoder
        self.collection = collection
        self.consistency = consistency
        self.index_type = index_type
        self.flush_writes = flush_writes
        self.metric = METRIC
        self.timeout = timeout_s  # every call's bound, pymilvus's own retries included
        self.client = milvus_client(uri, token)
        self._ensure()

    def _ensure(self) -> None:
        """Create the collection, or check and load the one there."""
        if self.client.has_collection(self.collection):
            return self._check_and_load()
        try:
            self._create()
        except Exception:  # noqa: BLE001 - re-raised unless the collection now exists
            if not self.client.has_collection(self.collection):
                raise
            self._check_and_load()  # another worker starting at the same time created it first

    def _check_and_load(self) -> None:
        """Refuse a collection of another dimension (two encoders' vectors must never mix); load it."""
        desc = self.client.describe_collection(self.collection)
        fields = {f["name"]: f for f in desc["fields"]}
        if "no" not in fields:
            raise ValueError(f"collection {self.collection!r} was made by an older streamrec (no catalog numbers): "
                             f"index the catalog into a new collection")
        have = int(fields["vector"]["params"]["dim"])
        if have != self.dim:
            raise EncoderMismatch(f"collection {self.collection!r} holds {have}-dim vectors, the encoder makes "
                                  f"{self.dim}: use another collection for another encoder")
        made_by = str((desc.get("properties") or {}).get(ENCODER_PROPERTY) or "")
        if self.encoder and made_by and made_by != self.encoder:
            raise EncoderMismatch(f"collection {self.collection!r} holds vectors of encoder {made_by!r}, this "
                                  f"worker's is {self.encoder!r}: set STREAMREC_ENCODER_BACKEND (and "
                                  f"STREAMREC_ENCODER_MODEL) to that encoder, or STREAMREC_MILVUS_COLLECTION "
                                  f"to another collection and index the catalog there")
        self.metric = self._vector_metric()
        self.client.load_collection(self.collection, timeout=self.timeout)

    def _vector_metric(self) -> str:
        """The metric of the collection's vector index (COSINE where it names none)."""
        for name in self.client.list_indexes(self.collection):
            desc = self.client.describe_index(self.collection, name) or {}
            if desc.get("field_name") == "vector":
                return str(desc.get("metric_type") or "COSINE")
        return "COSINE"

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        c = self.client
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("title", DataType.VARCHAR, max_length=8192)
        schema.add_field("category", DataType.VARCHAR, max_length=1024)
        schema.add_field("scenes", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_SCENES,
                         max_length=1024)
        schema.add_field("available", DataType.BOOL)
        schema.add_field("ts", DataType.DOUBLE)
        schema.add_field("no", DataType.INT64)
        index = c.prepare_index_params()
        if self.index_type not in INDEX_PARAMS:
            raise ValueError(f"vector index {self.index_type!r}: choose from {sorted(INDEX_PARAMS)}")
        index.add_index(field_name="vector", index_type=self.index_type, metric_type=METRIC,
                        params=INDEX_PARAMS[self.index_type])
        c.create_collection(self.collection, schema=schema, index_params=index, consistency_level=self.consistency,
                            properties={ENCODER_PROPERTY: self.encoder} if self.encoder else None)

    def _read(self, call: Callable[[], T]) -> T:
        """Run a read; a collection found released (a restarted Milvus loads nothing by itself) is
        loaded again and the read repeated once. Other errors propagate to the caller's retry."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not _not_loaded(exc):
                raise
        self.client.load_collection(self.collection, timeout=self.timeout)
        return call()

    def upsert(self, rows: Sequence[ItemRow]) -> None:
        if not rows:
            return
        data = [{"item_id": r.item_id, "vector": np.asarray(r.vector, dtype=np.float32).tolist(),
                 "title": r.title[:8000], "category": r.category[:1000], "scenes": list(r.scenes)[:MAX_SCENES],
                 "available": bool(r.available), "ts": float(r.timestamp), "no": int(r.no)} for r in rows]
        self.client.upsert(self.collection, data, timeout=self.timeout)
        if self.flush_writes:
            self.client.flush(self.collection, timeout=self.timeout)

    def delete(self, item_ids: Sequence[str]) -> None:
        if item_ids:
            self.client.delete(self.collection, ids=list(item_ids), timeout=self.timeout)
            if self.flush_writes:
                self.client.flush(self.collection, timeout=self.timeout)

    def get(self, item_ids: Sequence[str]) -> dict[str, Candidate]:
        if not item_ids:
            return {}
        ids = list(dict.fromkeys(item_ids))
        rows = self._read(lambda: self.client.get(self.collection, ids=ids, output_fields=_OUT, timeout=self.timeout))
        return {r["item_id"]: _candidate(r["item_id"], 0.0, r) for r in rows}

    def search(self, vectors: np.ndarray, limit: int, categories: Sequence[str] = (),
               exclude: Collection[int] = ()) -> list[list[Candidate]]:
        if len(vectors) == 0:
            return []
        limit = max(1, min(limit, 16_384))
        expr = "available == true"
        if categories:
            expr += " and category in [" + ", ".join(json.dumps(c) for c in categories) + "]"
        if exclude:
            # Filtering in the index costs less than asking for |exclude| more results: on Milvus
            # Lite at 10,000 items, 24 results past 2,700 excluded ids take 50 ms against 250 ms.
            expr += " and no not in [" + ", ".join(str(int(i)) for i in sorted(exclude)) + "]"
        # Ids, catalog numbers and scores only: returning vectors and attributes costs more than
        # the search itself on Milvus Lite; callers fetch the attributes of the few they keep,
        # through a cache. (An empty output_fields returns every field on Milvus Lite.)
        data = np.asarray(vectors, dtype=np.float32).tolist()
        params = {"metric_type": self.metric}
        if self.index_type == "HNSW":
            params["params"] = {"ef": min(max(limit, HNSW_MIN_EF), 32_768)}
        return self._read(lambda: _hits(self.client.search(
            self.collection, data=data, limit=limit, filter=expr, output_fields=["no"], search_params=params,
            consistency_level=self.consistency, timeout=self.timeout, _async=True), self.timeout))

    def count(self) -> int:
        rows = self._read(lambda: self.client.query(self.collection, filter="", output_fields=["count(*)"],
                                                    consistency_level="Strong", timeout=self.timeout))
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self.client.close()


def _hits(future, timeout: float) -> list[list[Candidate]]:
    """The hits of a search sent with ``_async=True``, read from the server's reply as it came
    (the gRPC future inside pymilvus's, as pinned in pyproject.toml): pymilvus's own result builds
    an object per hit, which cost the worker about a tenth of its time."""
    from pymilvus.client.utils import check_status
    from pymilvus.exceptions import MilvusException

    try:
        reply = future._future.result(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - as pymilvus says it
        raise MilvusException(message=str(exc)) from exc
    if reply is None:
        raise MilvusException(message="Received None response from server during search")
    check_status(reply.status)
    return search_hits(reply.results)


def search_hits(res) -> list[list[Candidate]]:
    """Each query's hits (id, score, catalog number) from a ``SearchResultData`` reply."""
    ids = res.ids.str_id.data if res.ids.HasField("str_id") else res.ids.int_id.data
    nos = next((f.scalars.long_data.data for f in res.fields_data if f.field_name == "no"), None)
    ids, scores = list(ids), list(res.scores)
    nos = list(nos) if nos is not None else [-1] * len(ids)
    out, start = [], 0
    for topk in res.topks:
        end = start + topk
        out.append([Candidate(i, d, no=n) for i, d, n in zip(ids[start:end], scores[start:end], nos[start:end])])
        start = end
    return out


def _not_loaded(exc: BaseException) -> bool:
    """Milvus says the collection is not loaded (code 101), e.g. after the server restarted."""
    text = str(exc).lower()
    return getattr(exc, "code", None) == 101 or "released" in text or "not loaded" in text


def _candidate(item_id: str, similarity: float, e: dict) -> Candidate:
    return Candidate(item_id, similarity, np.asarray(e["vector"], dtype=np.float32), e.get("title", ""),
                     e.get("category", ""), tuple(e.get("scenes") or ()), bool(e.get("available", True)),
                     int(e.get("no", -1)))
