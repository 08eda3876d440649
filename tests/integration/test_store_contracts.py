"""One contract suite per store interface, run against every implementation: the in-memory ones
and the real servers (redis-server, a Redis Cluster, Milvus Lite, and Milvus standalone with a
token and the HNSW index)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
import uuid

import numpy as np
import pytest

from models.params import ModelParams
from models.profile import Applied, Profile, apply_click, apply_query
from streams.stores import ClickEffect, Effects, ItemRow, StoreOptions, Write, open_item_index, open_profile_store
from streams.stores.items import EncoderMismatch
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


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration),
                        pytest.param("redis-resp3", marks=pytest.mark.integration),
                        pytest.param("redis-cluster", marks=[pytest.mark.integration, pytest.mark.cluster])])
def url(request):
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    if request.param == "redis-resp3":  # replies shaped otherwise (scores as doubles, pairs nested)
        base = request.getfixturevalue("redis_url")
        return base + ("&" if "?" in base else "?") + "protocol=3"
    return request.getfixturevalue("redis_cluster").url


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i % DIM] = 1.0
    return v


OPTIONS = StoreOptions(shards=4, popularity_halflife_s=3600.0, cooccur_halflife_s=3600.0, cooccur_keep=3)


def run(url, test, options: StoreOptions = OPTIONS):
    """Run ``test(store)`` on a fresh store (fresh key prefix) inside one event loop."""
    async def go():
        store = open_profile_store(url, f"c-{uuid.uuid4().hex[:8]}", options)
        try:
            await test(store)
        finally:
            await store.close()
    asyncio.run(go())


def clicks(*specs, source="events:0"):
    """Effects of clicks given as (offset, item, previous items[, scene, time])."""
    fx = Effects()
    for spec in specs:
        off, item, prev, *rest = spec
        scene, t = (rest + [None, 0.0])[:2] if rest else (None, 0.0)
        fx.clicks.append((source, off, ClickEffect(item, scene, t, 1.0, prev)))
    return fx


def test_profile_round_trip_and_compare_and_set(url):
    async def go(store):
        p = (await store.load(["u1"]))["u1"]
        assert p.version == 0 and p.is_cold and not p.reset
        apply_click(p, "i1", 7, unit(1), "One", "a", "tv", 1.0, 10.0, P)
        apply_query(p, "hello", unit(2), "tv", "e2", 11.0, P)
        p.applied.record(Applied.source("events", 0), 5, "e2", P.recent_events)
        assert await store.commit([Write(p, 0)]) == [True] and p.version == 1
        q = (await store.load(["u1"]))["u1"]
        assert q.version == 1 and q.seen == {7} and q.clicks == 1 and q.queries == 1
        assert np.allclose(q.long, p.long, atol=0.01) and np.allclose(q.scenes["tv"], p.scenes["tv"], atol=0.01)
        assert [e.kind for e in q.explainers] == ["click", "query"]
        assert q.applied.seen_before(Applied.source("events", 0), 5, "x")
        stale = (await store.load(["u1"]))["u1"]
        assert await store.commit([Write(q, 1), Write(Profile("u2"), 0)]) == [True, True]
        assert await store.commit([Write(stale, 1), Write(Profile("u2"), 0)]) == [False, False]  # both changed
        assert (await store.load(["u1"]))["u1"].version == 2
        if await store.memory_usage("u1"):  # Redis: the bytes of the one key a user has
            assert 100 < await store.memory_usage("u1") < 1000
    run(url, go)


def test_forget_leaves_a_tombstone_that_recognises_redeliveries(url):
    async def go(store):
        p = Profile(user_id="gone")
        apply_click(p, "i1", 1, unit(1), "One", "a", None, 1.0, 1.0, P)
        p.applied.record(Applied.source("events", 3), 40, "e1", P.recent_events)
        await store.commit([Write(p, 0)])
        await store.commit([Write(Profile(user_id="gone", applied=p.applied), 1, forgotten=True)])
        q = (await store.load(["gone"]))["gone"]
        assert q.version == 2 and q.is_cold and not q.seen and not q.history and q.clicks == 0
        assert q.applied.seen_before(Applied.source("events", 3), 40, "other")
    run(url, go)


def test_unreadable_records_give_a_fresh_profile_with_the_reason(url):
    async def go(store):
        if url == "memory://":
            store.corrupt("bad", b"not a record")
        else:
            key = store.user_key("bad")
            await store.redis.hset(key, "meta", "{}")  # another type under the user's key
            store_other = store.user_key("junk")
            await store.redis.set(store_other, b"SR\x07garbage")
        p = (await store.load(["bad"]))["bad"]
        assert p.reset and p.version == 0 and p.is_cold
        assert await store.commit([Write(p, 0)]) in ([True], [False])
        assert await store.commit([Write(p, p.version, replace=True)]) == [True]
        assert not (await store.load(["bad"]))["bad"].reset
        if url != "memory://":
            assert "schema 7" in (await store.load(["junk"]))["junk"].reset
    run(url, go)


def test_effects_apply_once_per_source_offset_whatever_the_batching(url):
    async def go(store):
        batch = clicks((0, "a", []), (1, "b", ["a"]), (2, "a", ["a", "b"]), (3, "c", ["b", "a"], "tv", 10.0))
        batch.count("events:0", 0, "events_in")
        batch.count("events:0", 3, "events_in")
        batch.count("events:0", 3, "redelivered")
        await store.apply(batch)
        await store.apply(batch)  # the same batch again
        again = clicks((2, "a", ["a", "b"]), (3, "c", ["b", "a"], "tv", 10.0), (4, "b", ["c"]))
        await store.apply(again)  # overlapping: only offset 4 is new
        pop = dict(await store.popular(None, 10))
        assert pop["a"] == pytest.approx(2.0, rel=1e-3) and pop["b"] == pytest.approx(2.0, rel=1e-3)
        assert pop["c"] == pytest.approx(2 ** (10 / 3600), rel=1e-3)
        assert [i for i, _ in await store.popular("tv", 1)] == ["c"]
        co = await store.cooccurring(["a", "b", "c"], 5)
        # co(a,b): offsets 1 and 2 (a clicked after b) -> 2; co(b,c): 3 and 4 -> 2; co(a,c): 3 -> 1
        assert dict(co["b"])["a"] == pytest.approx(2 / math.sqrt(2 * 2), rel=1e-3)
        assert dict(co["b"])["c"] == pytest.approx(2 / math.sqrt(2 * 1), rel=1e-3)
        assert dict(co["a"])["c"] == pytest.approx(1 / math.sqrt(2 * 1), rel=1e-3)
        assert await store.cooccurring(["a", "b", "c"], 0) == co  # 0: every partner kept
        assert [len(v) for v in (await store.cooccurring(["a", "b", "c"], 1)).values()] == [1, 1, 1]
        tr = await store.transitions(["a", "b", "c"], 5)
        # steps (offset, gap): a->b (1, 1), b->a (2, 1), a->c (3, 1), b->c (3, 2), c->b (4, 1); the
        # replayed offsets add nothing; each over the clicks of its source item (a 2, b 2, c 1)
        assert dict(tr["a"]) == pytest.approx({"b": 1 / 2, "c": 1 / 2}, rel=5e-3)  # c at t=10 s
        assert dict(tr["b"]) == pytest.approx({"a": 1 / 2, "c": 0.5 / 2}, rel=5e-3)
        assert tr["c"] == [("b", pytest.approx(1.0, rel=5e-3))]
        n = await store.item_clicks(["a", "c", "zz"], at=10.0)
        assert n["c"] == pytest.approx(1.0, rel=1e-6) and n["zz"] == 0.0
        assert n["a"] == pytest.approx(2 * 2 ** (-10 / OPTIONS.cooccur_halflife_s), rel=1e-6)  # both at t=0
        stats = await store.stats()
        assert stats["events_in"] == 2 and stats["redelivered"] == 2  # per delivery
        other = clicks((0, "a", []), source="replayed:0")  # another source has its own watermark
        await store.apply(other)
        assert dict(await store.popular(None, 1))["a"] == pytest.approx(3.0, rel=1e-3)
    run(url, go)


def test_item_ids_scenes_and_sources_with_any_characters_keep_their_effects(url):
    # the Redis store sends a shard's effects as one JSON argument: quotes, backslashes, control
    # characters and non-ASCII text must come back as they went in
    a, b, c = 'say "hi"', "back\\slash,\n", "caf\u00e9 \U0001f3ac"
    async def go(store):
        fx = clicks((0, a, [], 'sc\u00e8ne "1"', 0.0), (1, b, [a]), (2, c, [a, b]), source='src "\u00e9":0')
        fx.count('src "\u00e9":0', 2, "events_in")
        await store.apply(fx)
        await store.apply(fx)  # once per source and offset
        assert {i for i, _ in await store.popular(None, 10)} == {a, b, c}
        assert [i for i, _ in await store.popular('sc\u00e8ne "1"', 1)] == [a]
        co = await store.cooccurring([a, b, c], 5)
        assert {x for x, _ in co[c]} == {a, b} and {x for x, _ in co[a]} == {b, c}
        tr = await store.transitions([a, b], 5)
        assert dict(tr[a]) == pytest.approx({b: 1.0, c: 0.5}) and dict(tr[b]) == pytest.approx({c: 1.0})
        assert (await store.item_clicks([a, b, c], at=0.0)) == pytest.approx({a: 1.0, b: 1.0, c: 1.0})
        assert (await store.stats())["events_in"] == 1
    run(url, go)


def test_the_rankers_steps_apply_once_per_source_offset(url):
    from models.learning import FEATURES, MODEL_ID

    async def go(store):
        assert await store.model() == {}
        if url != "memory://":  # a server that lost its scripts (a restart, a failover) gets them again
            await store.redis.script_flush()
        step = np.arange(len(FEATURES), dtype=float) / 10
        fx = Effects()
        fx.learn += [("events:0", 3, step), ("events:0", 4, -2 * step), ("events:1", 0, step)]
        await store.apply(fx)
        await store.apply(fx)  # the same batch again
        again = Effects()
        again.learn += [("events:0", 4, -2 * step), ("events:0", 5, step)]  # only offset 5 is new
        await store.apply(again)
        model = await store.model()
        assert model["model"] == MODEL_ID and model["steps"] == 4
        assert [model[f] for f in FEATURES] == pytest.approx((step - 2 * step + step + step).tolist())
    run(url, go)


def test_popular_merges_the_shards_exactly_and_published_tells_what_was_applied(url):
    async def go(store):
        # item i clicked i % 23 + 1 times: ties and uneven shards; the top 40 come back exactly
        fx = clicks(*[(off, f"i{i:03d}", []) for off, i in enumerate(i for i in range(120) for _ in range(i % 23 + 1))])
        for off in range(len(fx.clicks)):  # as the pipeline does: every message counts in the stats
            fx.count("events:0", off, "events_in")
        await store.apply(fx)
        want = sorted(((f"i{i:03d}", float(i % 23 + 1)) for i in range(120)), key=lambda kv: (-kv[1], kv[0]))[:40]
        got = await store.popular(None, 40)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-6)
        assert await store.published(["events:0", "other:1"]) == {"events:0": len(fx.clicks) - 1, "other:1": -1}
    run(url, go)


def test_a_begun_batch_is_known_until_its_stats_are_applied(url):
    async def go(store):
        assert await store.positions(["events:0"]) == {"events:0": (-1, {})}
        batch = {"events:0": 4, "events:1": 2}
        assert await store.begin(batch) == {"events:0": -1, "events:1": -1}
        assert await store.positions(["events:1", "events:0"]) == {"events:1": (-1, batch), "events:0": (-1, batch)}
        fx = Effects()
        for off in range(5):
            fx.count("events:0", off, "events_in")
        await store.apply(fx)
        assert await store.positions(["events:0"]) == {"events:0": (4, batch)}  # done: no longer ahead
    run(url, go)


def test_popularity_decays_with_event_time_and_survives_rescaling(url):
    async def go(store):
        await store.apply(clicks(*[(n, "old", []) for n in range(4)]))
        # 3 half-lives later one click outweighs four old ones (4 / 2**3 < 1)
        await store.apply(clicks((4, "new", [], "tv", 3 * 3600.0)))
        assert [i for i, _ in await store.popular(None, 2)] == ["new", "old"]
        # far in the future (past the rescaling point) the order still follows decayed weight
        await store.apply(clicks((5, "later", [], None, 100 * 3600.0), (6, "later", [], None, 100 * 3600.0),
                                 (7, "new", [], None, 100 * 3600.0)))
        top = await store.popular(None, 3)
        assert [i for i, _ in top] == ["later", "new", "old"]
        assert top[0][1] == pytest.approx(2 * top[1][1], rel=1e-6)
        assert [i for i, _ in await store.popular("tv", 1)] == ["new"]
        # each item's popularity relative to the top, in the list popular() reads: the scene's
        # own once it holds ``enough`` items, else all clicks; 0 for an item never clicked
        rel = await store.popularity(["new", "old", "later", "never"], None, 1)
        assert rel == pytest.approx({"later": 1.0, "new": 0.5, "old": top[2][1] / top[0][1], "never": 0.0}, rel=1e-6)
        assert await store.popularity(["new", "later"], "tv", 1) == pytest.approx({"new": 1.0, "later": 0.0})
        assert await store.popularity(["new", "later"], "tv", 2) == pytest.approx({"new": 0.5, "later": 1.0})
        assert [i for i, _ in await store.popular("tv", 2, enough=1)] == ["new"]
        assert [i for i, _ in await store.popular("tv", 1, enough=2)] == ["later"]
        await store.remove_items(["later"])
        assert "later" not in [i for i, _ in await store.popular(None, 5)]
    run(url, go)


def test_popular_and_popularity_of_many_scenes_read_together_are_each_scenes_own(url):
    """popular_many and popularity_many (the worker reads every scene of a batch in one round
    trip) give each scene exactly what popular and popularity give it alone: the scene's own
    list where it holds ``enough`` items, else all clicks; lopsided shards read further."""
    async def go(store):
        specs = [(n, f"i{n % 23}", [], ["tv", "web", None][n % 3], float(n)) for n in range(60)]
        specs += [(60 + n, "hot", [], "tv", 30.0) for n in range(12)]  # one item far ahead of the rest
        await store.apply(clicks(*specs))
        scenes = ["tv", None, "web", "radio"]  # radio: never clicked in, so all clicks are read
        for n, enough in ((1, None), (5, None), (5, 30), (40, 3)):
            many = await store.popular_many(scenes, n, enough)
            assert list(many) == scenes
            for scene in scenes:
                assert many[scene] == await store.popular(scene, n, enough)
        in_tv = {item for _, item, _, scene, _ in specs if scene == "tv"}
        assert {i for i, _ in (await store.popular_many(["tv"], 40, 3))["tv"]} == in_tv
        items = {"tv": ["hot", "i0", "never"], None: ["i1", "hot"], "web": [], "radio": ["i2"]}
        for enough in (1, 30):
            many = await store.popularity_many(items, enough)
            assert many == {scene: await store.popularity(ids, scene, enough) for scene, ids in items.items()}
        assert (await store.popularity_many(items, 1))["tv"]["hot"] == 1.0
        assert await store.popularity_many({}, 1) == {}
    run(url, go)


def test_the_best_steps_of_a_long_row_are_those_of_the_whole_row(url):
    """transitions(n) ranks a row's steps by count over the source's clicks, ties by item id: a
    store may read a row only down to its n-th count, and gives exactly the best n of the whole
    row, ties at the n-th place included."""
    async def go(store):
        # source s, then each of its next items after it: x1 three times, x2..x5 twice, x6 once
        nexts = ["x1"] * 3 + ["x5", "x4", "x3", "x2"] * 2 + ["x6"]
        specs = [(n, "s", [], None, 0.0) for n in range(3)]
        specs += [(n, item, ["s"], None, 0.0) for n, item in enumerate(nexts, 3)]  # equal counts tie exactly
        await store.apply(clicks(*specs))
        full = (await store.transitions(["s"], 10))["s"]
        assert [b for b, _ in full] == ["x1", "x2", "x3", "x4", "x5", "x6"]
        for n in range(1, 7):
            assert (await store.transitions(["s"], n))["s"] == full[:n]
            ids, weights = (await store.transitions_arrays(["s"], n))["s"]
            assert dict(zip(ids, weights.tolist())) == dict(full[:n])  # the same ties broken by id
    run(url, go, StoreOptions(shards=4, popularity_halflife_s=1e9, cooccur_halflife_s=1e9, cooccur_keep=10))


def test_partner_arrays_hold_exactly_the_partners_and_weights_of_the_rows(url):
    """cooccurring_arrays and transitions_arrays (what the worker sums) give each item the very
    partners and weights, to the last bit, that cooccurring and transitions list best first."""
    import random

    async def go(store):
        rng = random.Random(4)
        items = [f"i{n}" for n in range(30)]
        specs = [(n, rng.choice(items), rng.sample(items, rng.randint(0, 6)), rng.choice([None, "tv"]),
                  float(rng.randint(0, 7200))) for n in range(300)]
        await store.apply(clicks(*specs))
        asked = items + ["never-clicked"]
        for n in (0, 1, 3):
            for lists, arrays in ((store.cooccurring, store.cooccurring_arrays),
                                  (store.transitions, store.transitions_arrays)):
                want, got = await lists(asked, n), await arrays(asked, n)
                assert set(got) == set(want) == set(asked)
                for a in asked:
                    ids, weights = got[a]
                    assert len(ids) == len(weights) and weights.dtype == np.float64
                    assert dict(zip(ids, weights.tolist())) == dict(want[a])
        every = await store.cooccurring_arrays(asked, 0)
        assert sum(len(every[a][0]) for a in asked) > 100
    run(url, go, StoreOptions(shards=4, popularity_halflife_s=3600.0, cooccur_halflife_s=3600.0, cooccur_keep=50))


@pytest.mark.integration
@pytest.mark.parametrize("length", [0, 1, 3999, 4000, 9001])
def test_a_partner_row_of_any_length_comes_back_with_every_score_exact(redis_url, length):
    """The Redis script that reads partner rows packs their scores in chunks: every member and
    every score of a row comes back as the sorted set holds it, to the last bit, at any length."""
    import redis.asyncio as aioredis

    from streams.stores.redis_profiles import _joined_row

    async def go(store):
        rng = np.random.default_rng(length)
        scores = rng.choice([1.0, 1e-300, 3.5e250, 0.1], length) * rng.random(length)
        members = {f"p{n}-ü": float(v) for n, v in enumerate(scores)}
        key = store.shard_key(0, "co:src")
        direct = aioredis.from_url(redis_url)
        try:
            if members:
                await direct.zadd(key, members)
            want = await direct.zrevrange(key, 0, -1, withscores=True)
        finally:
            await direct.aclose()
        [[reply]] = await store._pipeline(lambda pipe: store._script(pipe, store._rows, [key], [0]))
        ids, got = _joined_row(reply)
        assert ids == [m.decode() for m, _ in want]
        assert got.tobytes() == np.array([s for _, s in want], dtype="<f8").tobytes()
    run(redis_url, go)


def test_cooccurrence_keeps_the_strongest_partners_so_new_ones_displace_stale_ones(url):
    async def go(store):
        assert await store.cooccurring(["a"], 5) == {"a": []}
        # at t=0, a is clicked with d, e, f (3 partners, the most kept); an hour later with g
        await store.apply(clicks((0, "a", ["d", "e", "f"]), (1, "d", []), (2, "e", []), (3, "f", [])))
        await store.apply(clicks((4, "a", ["g"], None, 3600.0), (5, "g", [], None, 3600.0)))
        got = await store.cooccurring(["a"], 5)
        assert got["a"][0][0] == "g" and len(got["a"]) == 3  # the newest partner is kept, the weakest old one went
        await store.remove_items(["g"])
        assert "g" not in [x for x, _ in (await store.cooccurring(["a"], 5))["a"]]
        assert (await store.transitions(["d"], 5))["d"] and not (await store.transitions(["g"], 5))["g"]
        await store.remove_items(["d"])
        assert (await store.transitions(["d"], 5)) == {"d": []}
    run(url, go)


def test_catalog_numbers_registry_progress_and_stats(url):
    async def go(store):
        first = await store.number_items(["a", "b", "a"])
        assert first == {"a": 0, "b": 1}
        assert await store.number_items(["c", "b"]) == {"c": 2, "b": 1}
        await store.add_items([("a", 1.0, "x"), ("b", 2.0, "y"), ("c", 3.0, "x")])
        assert await store.category_count() == 2
        assert [i for i, _ in await store.newest(2)] == ["c", "b"]
        await store.remove_items(["c"])
        assert [i for i, _ in await store.newest(5)] == ["b", "a"]
        await store.set_catalog_progress({0: 5, 1: 2})
        await store.set_catalog_progress({0: 3})  # never back
        assert await store.catalog_progress() == {0: 5, 1: 2}
        fx = Effects()
        for off in range(3):
            fx.count("events:1", off, "events_in")
        fx.count("events:1", 2, "dead_letters")
        await store.apply(fx)
        await store.apply(fx)
        stats = await store.stats()
        assert stats["events_in"] == 3 and stats["dead_letters"] == 1 and stats["events_applied"] == 0
    run(url, go)


MILVUS = [pytest.param("milvus-lite", marks=pytest.mark.integration),
          pytest.param("milvus-standalone", marks=pytest.mark.integration)]


def milvus_at(request, kind: str) -> dict:
    """Where a Milvus index lives: the embedded Milvus Lite server (FLAT), or Milvus standalone
    (HNSW, with its token); the keywords of :func:`open_item_index` but the collection."""
    if kind == "milvus-lite":
        return {"uri": request.getfixturevalue("embedded").milvus_uri}
    server = request.getfixturevalue("milvus_standalone")
    return {"uri": server.uri, "token": server.token, "index_type": "HNSW"}


@pytest.fixture(params=MILVUS)
def milvus(request) -> dict:
    return milvus_at(request, request.param)


@pytest.fixture(params=["memory", *MILVUS])
def index(request, tmp_path):
    if request.param == "memory":
        yield open_item_index("memory://", DIM)
        return
    at = milvus_at(request, request.param)
    ix = open_item_index(at.pop("uri"), DIM, f"c_{uuid.uuid4().hex[:8]}", **at)
    yield ix
    ix.close()


def test_item_index_contract(index):
    rows = [ItemRow(f"i{n}", unit(n), f"T{n}", "a" if n < 4 else "b", ("tv",), n != 3, float(n), 100 + n)
            for n in range(8)]
    index.upsert(rows)
    assert index.count() == 8
    got = index.get(["i1", "i5", "missing"])
    assert set(got) == {"i1", "i5"} and got["i5"].category == "b" and np.allclose(got["i1"].vector, unit(1))
    assert got["i5"].no == 105
    hits = index.search(np.stack([unit(1), unit(3)]), 3)
    assert hits[0][0].item_id == "i1" and hits[0][0].similarity == pytest.approx(1.0, abs=1e-5)
    assert hits[0][0].no == 101  # searches give catalog numbers, which seen sets hold
    assert "i3" not in [h.item_id for h in hits[1]]  # unavailable items are never returned
    assert index.get(["i3"])["i3"].available is False and got["i1"].available is True
    index.upsert([ItemRow("i1", unit(2), "T1b", "a", (), True, 9.0, 101)])  # replace
    assert index.get(["i1"])["i1"].title == "T1b" and index.count() == 8
    index.delete(["i2", "nope"])
    assert index.count() == 7
    assert "i2" not in [h.item_id for h in index.search(np.stack([unit(2)]), 8)[0]]
    # excluded items are never returned, for every row, and the limit is still filled from the rest
    q = unit(4) + 0.5 * unit(5) + 0.25 * unit(6) + 0.1 * unit(7)
    excl = index.search(np.stack([q / np.linalg.norm(q), unit(5)]), 3, exclude={104, 105, 999})
    assert all(len(row) == 3 and not {"i4", "i5"} & {h.item_id for h in row} for row in excl)
    assert [h.item_id for h in excl[0]][:2] == ["i6", "i7"]


def test_milvus_index_loads_a_released_collection_again(milvus):
    """A restarted Milvus holds collections released: reads load them again instead of failing
    forever (found by the Milvus outage test)."""
    from streams.stores.milvus_items import milvus_client

    name = f"c_{uuid.uuid4().hex[:8]}"
    ix = open_item_index(milvus["uri"], DIM, name, **{k: v for k, v in milvus.items() if k != "uri"})
    other = milvus_client(milvus["uri"], milvus.get("token", ""))
    try:
        ix.upsert([ItemRow(f"i{n}", unit(n), f"T{n}", "a", (), True, float(n), n) for n in range(4)])
        for read in (lambda: ix.search(np.stack([unit(1)]), 1)[0][0].item_id, lambda: sorted(ix.get(["i1"])),
                     lambda: ix.count()):
            other.release_collection(name)
            assert str(other.get_load_state(name)["state"]) == "NotLoad"
            assert read() in ("i1", ["i1"], 4)
    finally:
        other.close()
        ix.close()


def test_milvus_collection_records_its_encoder_and_refuses_another(milvus):
    """An index is never searched with vectors of another encoder than the one that built it."""
    name = f"c_{uuid.uuid4().hex[:8]}"
    kw = {k: v for k, v in milvus.items() if k != "uri"}
    uri = milvus["uri"]
    ix = open_item_index(uri, DIM, name, encoder="minilm:8:128", **kw)
    try:
        ix.upsert([ItemRow("i1", unit(1), "T1", "a", (), True, 1.0, 1)])
        again = open_item_index(uri, DIM, name, encoder="minilm:8:128", **kw)  # the same encoder: fine
        again.close()
        with pytest.raises(EncoderMismatch, match="holds vectors of encoder 'minilm:8:128', this worker's is "
                                                  "'minilm\\+int8:8:128'"):
            open_item_index(uri, DIM, name, encoder="minilm+int8:8:128", **kw)
        with pytest.raises(EncoderMismatch, match="holds 8-dim vectors, the encoder makes 16"):
            open_item_index(uri, 16, name, encoder="other:16:128", **kw)
    finally:
        ix.close()


def test_milvus_collections_search_by_inner_product_and_older_cosine_ones_keep_theirs(milvus):
    """New collections search unit vectors by inner product (their cosine, at less cost on Milvus
    Lite); a collection made with COSINE by an earlier release is still searched by COSINE."""
    from pymilvus import DataType

    from streams.stores.milvus_items import INDEX_PARAMS, milvus_client

    kw = {k: v for k, v in milvus.items() if k != "uri"}
    new, old = f"c_{uuid.uuid4().hex[:8]}", f"c_{uuid.uuid4().hex[:8]}"
    other = milvus_client(milvus["uri"], milvus.get("token", ""))
    ix = open_item_index(milvus["uri"], DIM, new, **kw)
    try:
        assert ix.metric == "IP"
        schema = other.create_schema(auto_id=False, enable_dynamic_field=False)
        for name, dtype, extra in (("item_id", DataType.VARCHAR, {"is_primary": True, "max_length": 64}),
                                   ("vector", DataType.FLOAT_VECTOR, {"dim": DIM}),
                                   ("title", DataType.VARCHAR, {"max_length": 64}),
                                   ("category", DataType.VARCHAR, {"max_length": 64}),
                                   ("available", DataType.BOOL, {}), ("ts", DataType.DOUBLE, {}),
                                   ("no", DataType.INT64, {})):
            schema.add_field(name, dtype, **extra)
        schema.add_field("scenes", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4, max_length=64)
        params = other.prepare_index_params()
        index_type = kw.get("index_type", "FLAT")
        params.add_index(field_name="vector", index_type=index_type, metric_type="COSINE",
                         params=INDEX_PARAMS[index_type])
        other.create_collection(old, schema=schema, index_params=params)
        older = open_item_index(milvus["uri"], DIM, old, **kw)
        try:
            assert older.metric == "COSINE"
            q = unit(1) + 0.5 * unit(2)
            q /= np.linalg.norm(q)
            rows = [ItemRow(f"i{n}", unit(n), f"T{n}", "a", (), True, float(n), n) for n in range(4)]
            for x in (ix, older):
                x.upsert(rows)
                hits = x.search(np.stack([q]), 2)[0]
                assert [h.item_id for h in hits] == ["i1", "i2"]
                assert [h.similarity for h in hits] == pytest.approx([float(q @ unit(1)), float(q @ unit(2))],
                                                                     abs=1e-5)
        finally:
            older.close()
    finally:
        other.close()
        ix.close()


def test_milvus_standalone_refuses_a_wrong_token_and_the_check_says_so_in_one_line(milvus_standalone):
    """Authentication is on for real: a wrong token is rejected, and the worker's startup check
    reports it in one line that names Milvus."""
    from streams.stores.milvus_items import milvus_client
    from workers.preflight import ServiceError, milvus_auth_error, milvus_probe, wait_until_up
    from streams.retry import Backoff
    from workers.settings import Settings

    with pytest.raises(Exception) as refused:  # pymilvus logs in when the client is made
        milvus_client(milvus_standalone.uri, "root:not-the-password", timeout=10).list_collections(timeout=10)
    assert milvus_auth_error(refused.value) is not None, refused.value
    good = milvus_client(milvus_standalone.uri, milvus_standalone.token, timeout=10)
    assert isinstance(good.list_collections(timeout=10), list)
    good.close()

    s = Settings(milvus_uri=milvus_standalone.uri, milvus_token="root:not-the-password")
    with pytest.raises(ServiceError) as told:
        asyncio.run(wait_until_up(milvus_probe(s), time.monotonic() + 30, Backoff(0.1, 1.0)))
    line = str(told.value)
    assert "\n" not in line and "Milvus" in line and "rejected the token" in line and "auth" in line, line
    assert "not-the-password" not in line
