"""One contract suite per store interface, run against every implementation: the in-memory ones
and the real servers (redis-server, Milvus Lite)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import uuid

import numpy as np
import pytest

from models.params import ModelParams
from models.profile import Profile, apply_click, apply_query
from streams.stores import ConflictError, ItemRow, PopularityUpdate, open_item_index, open_profile_store
from workers.stack import free_port, port_open, redis_server_bin, wait_for

DIM = 8
P = ModelParams()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([redis_server_bin(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), "redis-server", 30, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def url(request):
    return "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    return v


def run(url, test):
    """Run ``test(store)`` on a fresh store (fresh key prefix) inside one event loop."""
    async def go():
        store = open_profile_store(url, f"c-{uuid.uuid4().hex[:8]}", dedupe_window=3, popularity_halflife_s=3600.0,
                                   cooccur_keep=3)
        try:
            await test(store)
        finally:
            await store.close()
    asyncio.run(go())


def test_profile_round_trip_and_versions(url):
    async def go(store):
        p = (await store.load(["u1"]))["u1"]
        assert p.version == 0 and p.is_cold
        apply_click(p, "i1", unit(1), "One", "a", "tv", 1.0, "e1", 10.0, P)
        apply_query(p, "hello", unit(2), "tv", "e2", 11.0, P)
        assert await store.commit(p, 0, ["i1"], ["e1", "e2"]) == 1
        q = (await store.load(["u1"]))["u1"]
        assert q.version == 1 and q.seen == {"i1"} and q.clicks == 1 and q.queries == 1
        assert np.allclose(q.long, p.long) and np.allclose(q.scenes["tv"], p.scenes["tv"])
        assert [e.kind for e in q.explainers] == ["click", "query"]
        assert await store.applied([("u1", "e1"), ("u1", "e9"), ("u2", "e1")]) == [True, False, False]
        with pytest.raises(ConflictError):  # stale version
            await store.commit(p, 0, [], ["e3"])
        with pytest.raises(ConflictError):  # event already applied
            await store.commit(q, 1, [], ["e1"])
        assert (await store.load(["u1"]))["u1"].version == 1
    run(url, go)


def test_dedupe_window_keeps_the_latest_events(url):
    async def go(store):
        p = Profile(user_id="u")
        for n in range(5):
            await store.commit(p, n, [], [f"e{n}"])
        assert await store.applied([("u", f"e{n}") for n in range(5)]) == [False, False, True, True, True]
    run(url, go)


def test_forget_removes_everything(url):
    async def go(store):
        p = Profile(user_id="gone")
        apply_click(p, "i1", unit(1), "One", "a", None, 1.0, "e1", 1.0, P)
        await store.commit(p, 0, ["i1"], ["e1"])
        await store.forget("gone")
        q = (await store.load(["gone"]))["gone"]
        assert q.version == 0 and q.is_cold and not q.seen
        assert await store.applied([("gone", "e1")]) == [False]
    run(url, go)


def test_popularity_decays_with_event_time_and_survives_rescaling(url):
    async def go(store):
        await store.bump_popularity([PopularityUpdate("old", None, 0.0, 1.0) for _ in range(4)])
        # 3 half-lives later one click outweighs four old ones (4 / 2**3 < 1)
        await store.bump_popularity([PopularityUpdate("new", "tv", 3 * 3600.0, 1.0)])
        assert [i for i, _ in await store.popular(None, 2)] == ["new", "old"]
        # far in the future (past the rescaling point) the order still follows decayed weight
        await store.bump_popularity([PopularityUpdate("later", None, 100 * 3600.0, 1.0),
                                     PopularityUpdate("later", None, 100 * 3600.0, 1.0),
                                     PopularityUpdate("new", None, 100 * 3600.0, 1.0)])
        top = await store.popular(None, 3)
        assert [i for i, _ in top] == ["later", "new", "old"]
        assert top[0][1] == pytest.approx(2 * top[1][1], rel=1e-6)
        assert [i for i, _ in await store.popular("tv", 1)] == ["new"]
        await store.remove_items(["later"], ())
        assert "later" not in [i for i, _ in await store.popular(None, 5)]
    run(url, go)


def test_cooccurrence_counts_normalises_keeps_the_most_frequent_and_forgets_removed_items(url):
    from streams.stores.profiles import CoClick

    async def go(store):
        assert await store.cooccurring(["a"], 5) == {"a": []}
        # three users click a then b; one clicks a then c; b is also clicked after d, e, f, g
        await store.bump_cooccurrence([CoClick("a", []), CoClick("b", ["a"])] * 3
                                      + [CoClick("a", []), CoClick("c", ["a", "a"])]
                                      + [CoClick(x, []) for x in "defg"] + [CoClick("b", ["d", "e", "f", "g", "b"])])
        got = await store.cooccurring(["a", "b", "zz"], 5)
        # a: 4 clicks, b: 4 clicks, c: 1 click; co(a,b) = 3, co(a,c) = 1 (c's repeated 'a' counts once)
        assert [x for x, _ in got["a"]] == ["b", "c"] and got["zz"] == []
        assert got["a"][0][1] == pytest.approx(3 / math.sqrt(4 * 4)) and got["a"][1][1] == pytest.approx(1 / math.sqrt(4 * 1))
        # b has partners a (3) and d, e, f, g (1 each): 3 kept, a and the greatest ids of the ties (f, g)
        assert [x for x, _ in got["b"]] == ["a", "f", "g"]
        assert (await store.cooccurring(["a"], 1))["a"] == got["a"][:1]
        await store.remove_items(["b"], ())
        assert [x for x, _ in (await store.cooccurring(["a"], 5))["a"]] == ["c"]
    run(url, go)


def test_catalog_registry_and_stats(url):
    async def go(store):
        await store.add_items([("a", 1.0, "x"), ("b", 2.0, "y"), ("c", 3.0, "x")])
        assert await store.category_count() == 2
        assert [i for i, _ in await store.newest(2)] == ["c", "b"]
        await store.remove_items(["c"], ())
        assert [i for i, _ in await store.newest(5)] == ["b", "a"]
        await store.incr_stats({"events_in": 3, "dead_letters": 1})
        await store.incr_stats({"events_in": 2})
        stats = await store.stats()
        assert stats["events_in"] == 5 and stats["dead_letters"] == 1 and stats["events_applied"] == 0
    run(url, go)


@pytest.fixture(params=["memory", pytest.param("milvus", marks=pytest.mark.integration)])
def index(request, tmp_path):
    if request.param == "memory":
        yield open_item_index("memory://", DIM)
        return
    stack = request.getfixturevalue("stack")
    ix = open_item_index(stack.milvus_uri, DIM, f"c_{uuid.uuid4().hex[:8]}")
    yield ix
    ix.close()


def test_item_index_contract(index):
    rows = [ItemRow(f"i{n}", unit(n), f"T{n}", "a" if n < 4 else "b", ("tv",), n != 3, float(n)) for n in range(8)]
    index.upsert(rows)
    assert index.count() == 8
    got = index.get(["i1", "i5", "missing"])
    assert set(got) == {"i1", "i5"} and got["i5"].category == "b" and np.allclose(got["i1"].vector, unit(1))
    hits = index.search(np.stack([unit(1), unit(3)]), 3)
    assert hits[0][0].item_id == "i1" and hits[0][0].similarity == pytest.approx(1.0, abs=1e-5)
    assert "i3" not in [h.item_id for h in hits[1]]  # unavailable items are never returned
    assert index.get(["i3"])["i3"].available is False and got["i1"].available is True
    index.upsert([ItemRow("i1", unit(2), "T1b", "a", (), True, 9.0)])  # replace
    assert index.get(["i1"])["i1"].title == "T1b" and index.count() == 8
    index.delete(["i2", "nope"])
    assert index.count() == 7
    assert "i2" not in [h.item_id for h in index.search(np.stack([unit(2)]), 8)[0]]
    # excluded ids are never returned, for every row, and the limit is still filled from the rest
    q = unit(4) + 0.5 * unit(5) + 0.25 * unit(6) + 0.1 * unit(7)
    excl = index.search(np.stack([q / np.linalg.norm(q), unit(5)]), 3, exclude={"i4", "i5", 'say "hi"'})
    assert all(len(row) == 3 and not {"i4", "i5"} & {h.item_id for h in row} for row in excl)
    assert [h.item_id for h in excl[0]][:2] == ["i6", "i7"]


@pytest.mark.integration
def test_milvus_index_loads_a_released_collection_again(stack):
    """A restarted Milvus holds collections released: reads load them again instead of failing
    forever (found by the Milvus outage test)."""
    from streams.stores.milvus_items import milvus_client

    name = f"c_{uuid.uuid4().hex[:8]}"
    ix = open_item_index(stack.milvus_uri, DIM, name)
    other = milvus_client(stack.milvus_uri)
    try:
        ix.upsert([ItemRow(f"i{n}", unit(n), f"T{n}", "a", (), True, float(n)) for n in range(4)])
        for read in (lambda: ix.search(np.stack([unit(1)]), 1)[0][0].item_id, lambda: sorted(ix.get(["i1"])),
                     lambda: ix.count()):
            other.release_collection(name)
            assert str(other.get_load_state(name)["state"]) == "NotLoad"
            assert read() in ("i1", ["i1"], 4)
    finally:
        other.close()
        ix.close()
