"""Search hits read from the server's reply (``milvus_items.search_hits``): the same hits, in the
same order, as pymilvus's own reading of the reply."""

from __future__ import annotations

from pymilvus.client.search_result import SearchResult
from pymilvus.grpc_gen import schema_pb2

from models.ranking import Candidate
from streams.stores.milvus_items import search_hits


def _reply(topks: list[int], string_ids: bool = True) -> schema_pb2.SearchResultData:
    n = sum(topks)
    res = schema_pb2.SearchResultData(num_queries=len(topks), top_k=max(topks, default=0), topks=topks,
                                      scores=[1.0 - 0.013 * j for j in range(n)], output_fields=["no"])
    if string_ids:
        res.ids.str_id.data.extend(f"item-{j % 5}-{j}" for j in range(n))
    else:
        res.ids.int_id.data.extend(range(7, 7 + n))
    no = res.fields_data.add()
    no.field_name = "no"
    no.type = schema_pb2.DataType.Int64
    no.scalars.long_data.data.extend(range(100, 100 + n))
    return res


def _pymilvus(res: schema_pb2.SearchResultData) -> list[list[Candidate]]:
    return [[Candidate(i, float(d), no=int(row.get_raw_item(j)["entity"]["no"]))
             for j, (i, d) in enumerate(zip(row.ids, row.distances, strict=True))] for row in SearchResult(res)]


def test_hits_are_those_pymilvus_reads_from_the_same_reply():
    for topks in ([3, 0, 5, 1], [16] * 4, [0], []):
        for string_ids in (True, False):
            res = _reply(topks, string_ids)
            got = search_hits(res)
            assert got == _pymilvus(res)
            assert [len(h) for h in got] == topks
            assert all(type(c.similarity) is float and type(c.no) is int for h in got for c in h)
