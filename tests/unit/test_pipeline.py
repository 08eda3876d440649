"""The pipeline core with in-memory stores and a small deterministic encoder (no Kafka, no servers)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import numpy as np
import pytest

from models.params import ModelParams
from schemas import Limits
from models.profile import Applied
from streams.pipeline import CatalogBehind, ItemCache, Pipeline, RawMessage
from streams.stores import open_item_index, open_profile_store
from workers import demo_data


class WordHashEncoder:
    """Bag of hashed words: texts sharing words get close vectors. A unit-test stand-in for the
    transformer encoder (which tests/unit/test_encoder.py and the integration suite exercise)."""

    dim = 64
    version = "wordhash:64"

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").replace(",", " ").split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


CLOCK = [1_800_000_000.0]
CATALOG = demo_data.build_catalog(80)


def make_pipeline(**params) -> Pipeline:
    enc = WordHashEncoder()
    return Pipeline(open_profile_store("memory://"), open_item_index("memory://", enc.dim), enc, ModelParams(**params),
                    Limits(), k=5, item_cache=ItemCache(100, 60.0), clock=lambda: CLOCK[0])


OFFSETS: dict[str, int] = {}


def msgs(objs, topic="events"):
    """Messages as a log gives them: each at the next offset of its topic."""
    out = []
    for o in objs:
        n = OFFSETS[topic] = OFFSETS.get(topic, -1) + 1
        out.append(RawMessage(topic, 0, n, None, o if isinstance(o, bytes) else json.dumps(o).encode()))
    return out


def run(p, process, batch):
    """What an agent does with a batch: process it, (publish,) commit; then the output."""
    async def go():
        out = await process(batch)
        await p.commit(out)
        return out
    return asyncio.run(go())


def run_events(p, batch):
    return run(p, p.process_events, batch)


def run_catalog(p, batch):
    return run(p, p.process_catalog, batch)


def click(eid, user, item, **kw):
    return {"type": "click", "event_id": eid, "user_id": user, "item_id": item, "timestamp": 1000.0, **kw}


def items_of(cat):
    return [it["item_id"] for it in CATALOG if it["category"] == cat]


@pytest.fixture
def pipeline():
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, "catalog"))
    return p


def recs(out):
    return [json.loads(v) for _, v in out.recommendations]


def test_catalog_is_indexed_and_bad_catalog_input_dead_lettered():
    p = make_pipeline()
    out = run_catalog(p, msgs(CATALOG[:10] + [b"nope", {"type": "item", "item_id": "x"}], "catalog"))
    assert p.items.count() == 10
    assert out.stats["items_upserted"] == 10 and out.stats["dead_letters"] == 2
    errors = [json.loads(v)["error"] for _, v in out.dead_letters]
    assert errors == ["bad_json", "missing_field"]


def test_one_list_per_valid_event_and_dead_letters_with_reasons(pipeline):
    cooking = items_of("cooking")
    batch = [click("e1", "u", cooking[0]), b"\x00garbage", click("e2", "u", cooking[1]),
             click("e3", "u", "unknown-item"), {"type": "query", "event_id": "e4", "user_id": "u",
                                                "text": "risotto recipe", "timestamp": 1000.0}]
    out = run_events(pipeline, msgs(batch))
    produced = recs(out)
    assert [r["trigger_event_id"] for r in produced] == ["e1", "e2", "e4"]
    dead = [json.loads(v) for _, v in out.dead_letters]
    assert [d["error"] for d in dead] == ["bad_json", "unknown_item"]
    assert base64.b64decode(dead[0]["value_b64"]) == b"\x00garbage" and dead[0]["offset"] == OFFSETS["events"] - 3
    assert out.stats == {"events_in": 5, "events_applied": 3, "recommendations_out": 3, "dead_letters": 2}
    # the list after e1 excludes e1's item; the list after e2 excludes both
    assert cooking[0] not in {i["item_id"] for i in produced[0]["items"]}
    assert not {cooking[0], cooking[1]} & {i["item_id"] for i in produced[1]["items"]}
    # ... but the list after e1 is not affected by e2, which came later
    assert produced[0]["items"] != produced[1]["items"]


def test_replaying_a_batch_applies_nothing_twice(pipeline):
    batch = msgs([click("e1", "u", items_of("jazz")[0]), click("e2", "u", items_of("jazz")[1])])
    first = run_events(pipeline, batch)
    profile = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    again = run_events(pipeline, batch)
    after = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    assert first.stats["events_applied"] == 2 and again.stats.get("events_applied", 0) == 0
    assert again.stats["redelivered"] == 2 and all(r["duplicate"] for r in recs(again))
    assert asyncio.run(pipeline.profiles.stats())["events_applied"] == 2  # stats count an offset once
    assert after.version == profile.version == 1 and after.clicks == 2
    assert np.array_equal(after.long, profile.long)


def test_duplicates_inside_one_batch(pipeline):
    e = click("same", "u", items_of("travel")[0])
    out = run_events(pipeline, msgs([e, e]))
    assert out.stats["events_applied"] == 1 and out.stats["duplicates"] == 1
    assert [r["duplicate"] for r in recs(out)] == [False, True]


def test_cold_start_then_personal(pipeline):
    popular = items_of("fitness")[:2]
    run_events(pipeline, msgs([click(f"p{n}-{i}", f"o{n}", i) for n in range(3) for i in popular]))
    req = {"type": "request", "request_id": "r1", "user_id": "new", "timestamp": 1000.0, "k": 4}
    cold = recs(asyncio.run(pipeline.process_requests(msgs([req], "requests"))))[0]
    assert cold["cold_start"] and [i["item_id"] for i in cold["items"][:2]] == popular
    assert [i["reason"] for i in cold["items"][:2]] == ["popular now"] * 2
    warm = recs(run_events(pipeline, msgs([click("n1", "new", items_of("astronomy")[0])])))[0]
    assert not warm["cold_start"] and warm["items"][0]["reason"] != "popular now"


def test_requests_do_not_change_the_profile_and_honour_filters(pipeline):
    run_events(pipeline, msgs([click("e1", "u", items_of("gardening")[0])]))
    before = asyncio.run(pipeline.profiles.load(["u"]))["u"].version
    req = {"type": "request", "request_id": "r", "user_id": "u", "timestamp": 1000.0, "k": 3,
           "categories": ["jazz"], "exclude": [items_of("jazz")[0]]}
    out = recs(asyncio.run(pipeline.process_requests(msgs([req], "requests"))))[0]
    assert asyncio.run(pipeline.profiles.load(["u"]))["u"].version == before
    assert len(out["items"]) == 3 and all(i["category"] == "jazz" for i in out["items"])
    assert items_of("jazz")[0] not in [i["item_id"] for i in out["items"]]


def test_forget_deletes_the_profile_and_answers_nothing(pipeline):
    batch = [click("e1", "u", items_of("jazz")[0]),
             {"type": "forget", "event_id": "f1", "user_id": "u", "timestamp": 1000.0}]
    out = run_events(pipeline, msgs(batch))
    assert [r["trigger_event_id"] for r in recs(out)] == ["e1"]
    assert asyncio.run(pipeline.profiles.load(["u"]))["u"].is_cold
    assert out.stats["users_forgotten"] == 1 and out.stats["events_applied"] == 1


def test_deleted_items_leave_index_cache_and_lists(pipeline):
    jazz = items_of("jazz")
    run_events(pipeline, msgs([click("e1", "u", jazz[0])]))
    run_catalog(pipeline, msgs([{"type": "item_delete", "item_id": j, "timestamp": 1.0}
                                               for j in jazz[1:]], "catalog"))
    out = recs(run_events(pipeline, msgs([click("e2", "u", items_of("jazz")[0], scene="tv")])))
    assert not set(jazz[1:]) & {i["item_id"] for i in out[0]["items"]}
    dead = run_events(pipeline, msgs([click("e3", "u", jazz[1])]))
    assert [json.loads(v)["error"] for _, v in dead.dead_letters] == ["unknown_item"]


def test_item_cache_is_bounded_and_expires():
    now = [0.0]
    cache = ItemCache(2, 10.0, clock=lambda: now[0])
    from models.ranking import Candidate
    for i in "abc":
        cache.put(Candidate(i, 0.0))
    assert cache.get("a") is None and cache.get("c") is not None
    now[0] = 11.0
    assert cache.get("c") is None


def test_item_cache_drops_the_least_recently_used_and_reads_many_at_once():
    now = [0.0]
    cache = ItemCache(2, 10.0, clock=lambda: now[0])
    from models.ranking import Candidate
    cache.put(Candidate("a", 0.0))
    now[0] = 5.0
    cache.put(Candidate("b", 0.0))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put(Candidate("c", 0.0))
    found, missing = cache.get_many(["c", "b", "a", "x"])
    assert sorted(found) == ["a", "c"] and missing == ["b", "x"]
    now[0] = 10.0  # "a" was put at 0: expired, though used since
    found, missing = cache.get_many(["a", "c"])
    assert list(found) == ["c"] and missing == ["a"]
    cache.drop("c")
    assert cache.get("c") is None


def test_a_concurrent_writer_makes_the_batch_conflict_and_apply_once_when_processed_again(pipeline):
    from models.profile import Profile
    from streams.stores import ConflictError, Write

    store = pipeline.profiles
    commit = store.commit
    raced = []

    async def racing_commit(writes):
        if not raced:  # another writer commits first, once
            raced.append(True)
            await commit([Write(Profile(user_id="u"), 0)])
        return await commit(writes)

    store.commit = racing_commit
    batch = msgs([click("e1", "u", items_of("jazz")[0])])
    with pytest.raises(ConflictError):
        run_events(pipeline, batch)
    out = run_events(pipeline, batch)  # as the agent does: the same batch again, from the new profile
    assert raced and out.stats["events_applied"] == 1 and len(out.recommendations) == 1
    p = asyncio.run(store.load(["u"]))["u"]
    assert p.version == 2 and p.clicks == 1
    assert asyncio.run(store.stats())["events_applied"] == 1


@pytest.mark.parametrize("probe", [2, 1])
@pytest.mark.parametrize("exclude_in_index", [64, 1])
def test_lists_do_not_depend_on_how_events_are_batched(monkeypatch, exclude_in_index, probe):
    """Each list sees the profile right after its event: nothing from later events in the batch,
    whether seen items are over-fetched or excluded in the index (with later clicks of the batch
    added back). The shared signals (popularity, co-clicks, steps, learned weights) are off: they
    depend on how partitions interleave."""
    import streams.pipeline

    monkeypatch.setattr(streams.pipeline, "EXCLUDE_IN_INDEX", exclude_in_index)
    monkeypatch.setattr(streams.pipeline, "PROBE", probe)
    events = [click("e1", "u", items_of("jazz")[0], scene="tv"), click("e2", "u", items_of("cooking")[0], scene="tv"),
              {"type": "query", "event_id": "e3", "user_id": "u", "text": "slow cooked stew", "timestamp": 1000.0,
               "scene": "tv"},
              click("e4", "u", items_of("travel")[0], scene="mobile"), click("e5", "u", items_of("jazz")[1], scene="tv")]
    events += [click(f"j{n}", "u", item) for n, item in enumerate(items_of("jazz")[2:8])]
    shared = "popularity,cooccur,transitions,learning"
    together, apart = (make_pipeline(signals_off=shared), make_pipeline(signals_off=shared))
    for p in (together, apart):
        run_catalog(p, msgs(CATALOG, "catalog"))
    one_batch = recs(run_events(together, msgs(events)))
    one_by_one = [recs(run_events(apart, msgs([e])))[0] for e in events]
    assert [[i["item_id"] for i in r["items"]] for r in one_batch] == \
           [[i["item_id"] for i in r["items"]] for r in one_by_one]


@pytest.mark.parametrize("probe", [2, 1])
@pytest.mark.parametrize("exclude_in_index", [64, 1])
def test_a_list_never_sees_events_after_its_own(monkeypatch, exclude_in_index, probe):
    """The list for the first event of a batch, and the candidates it was ranked from, are those
    it gets alone, however many later clicks (its user's own, or everyone's) share the batch."""
    import streams.pipeline

    monkeypatch.setattr(streams.pipeline, "EXCLUDE_IN_INDEX", exclude_in_index)
    monkeypatch.setattr(streams.pipeline, "PROBE", probe)
    ranked_from: list[list[str]] = []  # candidates of each list, in the order lists are made
    real_rank = streams.pipeline.rank_many

    def spy(jobs, *args, **kw):
        for job in jobs:
            job.candidates = list(job.candidates)
            ranked_from.append(sorted(c.item_id for c in job.candidates))
        return real_rank(jobs, *args, **kw)

    monkeypatch.setattr(streams.pipeline, "rank_many", spy)
    jazz = items_of("jazz")
    first = click("e1", "u", jazz[0])
    later = [click(f"o{n}", f"other{n}", jazz[2 + n % 5]) for n in range(1, 15)]  # others make some jazz popular
    later += [click(f"e{n}", "u", item) for n, item in enumerate([*jazz[1:], *items_of("travel")[:3]], 2)]
    got = {}
    for name, batch in (("alone", [first]), ("together", [first, *later])):
        p = make_pipeline()
        assert p.params.w_popularity > 0
        run_catalog(p, msgs(CATALOG, "catalog"))
        ranked_from.clear()
        out = recs(run_events(p, msgs(batch)))
        assert out[0]["trigger_event_id"] == "e1" and len(ranked_from) == len(batch)
        got[name] = ([i["item_id"] for i in out[0]["items"]], ranked_from[0])
    assert got["together"] == got["alone"]


def test_a_lists_popular_candidates_and_popularity_do_not_depend_on_who_shares_its_batch(monkeypatch):
    """A list looks down the popularity order as far as its own seen items need, and reads the
    popularity of each of its candidates: a user with a long history in the same batch changes
    neither (the pool was once read as deep as the batch's longest history needed)."""
    import streams.pipeline

    monkeypatch.setattr(streams.pipeline, "POPULAR_READ", 8)  # the first read falls short for the long history
    seen_by_rank: list[tuple[str, dict[str, float]]] = []
    real_rank = streams.pipeline.rank_many

    def spy(jobs, *args, **kw):
        for job in jobs:
            job.candidates = list(job.candidates)
            seen_by_rank.append((job.profile.user_id,
                                 {c.item_id: job.signals.popularity.get(c.item_id, 0.0) for c in job.candidates}))
        return real_rank(jobs, *args, **kw)

    monkeypatch.setattr(streams.pipeline, "rank_many", spy)
    items = [it["item_id"] for it in CATALOG]
    # everyone clicks: item n is clicked by n % 7 + 1 users, so popularity reaches far down the catalog
    warm = [click(f"w{n}-{m}", f"crowd{m}", item) for n, item in enumerate(items) for m in range(n % 7 + 1)]
    heavy = [click(f"h{n}", "heavy", item) for n, item in enumerate(items[:40])]
    got = {}
    for name, batch in (("alone", [click("u1", "u", items[3])]),
                        ("beside a long history", [click("h-last", "heavy", items[41]), click("u1", "u", items[3])])):
        p = make_pipeline()
        run_catalog(p, msgs(CATALOG, "catalog"))
        run_events(p, msgs(warm))
        run_events(p, msgs(heavy))
        run_events(p, msgs([click("u0", "u", items[2])]))
        seen_by_rank.clear()
        out = [r for r in recs(run_events(p, msgs(batch))) if r["user_id"] == "u"]
        assert len(out) == 1
        got[name] = ([(i["item_id"], i["score"], i["reason"]) for i in out[0]["items"]],
                     [feats for user, feats in seen_by_rank if user == "u"])
        assert any(v > 0 for feats in got[name][1] for v in feats.values())
    assert got["beside a long history"] == got["alone"]


def test_seen_items_excluded_in_the_index_or_over_fetched_give_the_same_lists(monkeypatch):
    import streams.pipeline

    jazz, travel = items_of("jazz"), items_of("travel")
    batches = [[click(f"a{n}", "u", item) for n, item in enumerate(jazz[:4])],
               [click(f"b{n}", "u", item) for n, item in enumerate([*jazz[4:], *travel[:4]])]
               + [click(f"c{n}", f"v{n % 2}", jazz[n % 3]) for n in range(6)]]
    lists, probes = {}, {}
    for threshold in (1, 10_000):
        for probe in (1, 2, 50):  # the first plain search: too short for many lists, or long enough
            monkeypatch.setattr(streams.pipeline, "EXCLUDE_IN_INDEX", threshold)
            monkeypatch.setattr(streams.pipeline, "PROBE", probe)
            p = make_pipeline()
            run_catalog(p, msgs(CATALOG, "catalog"))
            lists[threshold, probe] = [[i["item_id"] for i in r["items"]]
                                       for b in batches for r in recs(run_events(p, msgs(b)))]
            probes[threshold, probe] = {o: p.metrics.probes.labels(o)._value.get() for o in ("hit", "miss")}
    assert all(got == lists[1, 2] for got in lists.values()) and len(lists[1, 2]) == sum(map(len, batches))
    # the lists are the same whether their first search sufficed or they searched again
    assert probes[1, 1]["miss"] > 0 and probes[10_000, 1]["miss"] > 0
    assert probes[1, 50]["miss"] == probes[10_000, 50]["miss"] == 0


def test_lists_and_their_scores_do_not_depend_on_the_last_bits_of_the_index_scores():
    """An index's float32 scores differ in their last bits with the shape of the call (how many
    queries it batches, what a filter leaves): the lists, scores included, must not."""
    rng = np.random.default_rng(7)

    class Noisy:
        """The memory index with every score moved by up to 3e-7, differently at every call."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def search(self, vectors, limit, categories=(), exclude=()):
            hits = self.inner.search(vectors, limit, categories, exclude)
            for row in hits:
                for c in row:
                    c.similarity = float(np.float32(c.similarity + rng.uniform(-3e-7, 3e-7)))
            return hits

    jazz, travel = items_of("jazz"), items_of("travel")
    batches = [[click(f"a{n}", f"u{n % 3}", item) for n, item in enumerate(jazz[:6])],
               [click(f"b{n}", f"u{n % 3}", item) for n, item in enumerate([*jazz[6:], *travel[:5]])]]
    got = []
    for noisy in (False, True):
        p = make_pipeline()
        if noisy:
            p.items = Noisy(p.items)
        run_catalog(p, msgs(CATALOG, "catalog"))
        got.append([[(i["item_id"], i["score"]) for i in r["items"]] for b in batches
                    for r in recs(run_events(p, msgs(b)))])
    assert got[0] == got[1] and len(got[0]) == sum(map(len, batches))


def test_items_clicked_together_by_others_are_recommended_with_that_reason():
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, "catalog"))
    jazz, cooking = items_of("jazz")[0], items_of("cooking")[3]
    history = [click(f"o{n}-{i}", f"other{n}", item) for n in range(4) for i, item in enumerate([jazz, cooking])]
    run_events(p, msgs(history))
    title = {it["item_id"]: it["title"] for it in CATALOG}
    out = recs(run_events(p, msgs([click("u1", "u", jazz)])))[0]
    assert out["items"][0]["item_id"] == cooking
    assert out["items"][0]["reason"] == f"often clicked with {title[jazz]}"
    off = make_pipeline(signals_off="cooccur,transitions")  # both bring a partner clicked after jazz
    run_catalog(off, msgs(CATALOG, "catalog"))
    run_events(off, msgs(history))
    assert cooking not in [i["item_id"] for i in recs(run_events(off, msgs([click("u1", "u", jazz)])))[0]["items"]]


def test_unavailable_items_are_never_recommended_however_popular_or_co_clicked():
    """An item made unavailable leaves the popular and co-click candidates, and clicks on it
    afterwards (it is still in the catalog) bring it back into neither."""
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, "catalog"))
    jazz, cooking = items_of("jazz")[0], items_of("cooking")[3]
    history = [click(f"o{n}-{i}", f"other{n}", item) for n in range(6) for i, item in enumerate([jazz, cooking])]
    run_events(p, msgs(history))
    before = recs(run_events(p, msgs([click("a1", "a", jazz)])))[0]
    assert cooking in [i["item_id"] for i in before["items"]]  # co-clicked and popular
    gone = next(it for it in CATALOG if it["item_id"] == cooking)
    run_catalog(p, msgs([{**gone, "available": False, "timestamp": 2.0}], "catalog"))
    later = [click(f"l{n}-{i}", f"late{n}", item) for n in range(6) for i, item in enumerate([jazz, cooking])]
    out = run_events(p, msgs(later + [click("b1", "b", jazz), {
        "type": "query", "event_id": "b2", "user_id": "b", "text": gone["title"], "timestamp": 1000.0}]))
    assert len(out.recommendations) == len(later) + 2 and not out.dead_letters  # clicks on it still apply
    lists = recs(out) + recs(run_events(p, msgs([click("c1", "c", jazz)])))
    assert all(cooking not in [i["item_id"] for i in r["items"]] for r in lists)
    assert cooking not in dict(asyncio.run(p.profiles.popular(None, 100)))


# -- exactly once, whatever step a batch stops at -------------------------------------------------

def popularity(p, item):
    return dict(asyncio.run(p.profiles.popular(None, 200))).get(item, 0.0)


def test_a_batch_stopped_before_its_writes_runs_again_with_the_same_lists_unmarked(pipeline):
    jazz = items_of("jazz")
    batch = msgs([click("e1", "u", jazz[0]), click("e2", "u", jazz[1]), click("e3", "v", jazz[0])])
    first = asyncio.run(pipeline.process_events(batch))  # published, then the worker died
    again = run_events(pipeline, batch)
    assert [r["items"] for r in recs(first)] == [r["items"] for r in recs(again)]
    assert not any(r["duplicate"] for r in recs(again))
    assert popularity(pipeline, jazz[0]) == pytest.approx(2.0)
    assert asyncio.run(pipeline.profiles.stats())["events_applied"] == 3


def test_a_batch_stopped_before_its_effects_is_taken_again_as_it_was(pipeline):
    """Lists see the ranker's weights and the per-item state as they were before their batch, so a
    batch taken again must be the same batch, even when more events are held this time."""
    jazz = items_of("jazz")
    first_part = msgs([click(f"a{i}", f"u{i % 3}", jazz[i % 4]) for i in range(6)])
    rest = msgs([click(f"b{i}", f"u{i % 3}", jazz[(i + 1) % 4]) for i in range(6)])
    assert asyncio.run(pipeline.next_batch(first_part, 6)) == list(range(6))
    first = asyncio.run(pipeline.process_events(first_part))  # published, then the worker died
    pipeline.lose_positions()  # a new worker
    held = first_part[:4]  # only part of the batch is fetched yet
    assert asyncio.run(pipeline.next_batch(held, 100)) is None  # wait for the rest of it
    assert asyncio.run(pipeline.next_batch(held, 100, force=True)) == [0, 1, 2, 3]  # or go without it
    pipeline.lose_positions()
    held = first_part + rest
    take = asyncio.run(pipeline.next_batch(held, 100))
    assert take == list(range(6))
    again = run_events(pipeline, [held[i] for i in take])
    assert [r["items"] for r in recs(again)] == [r["items"] for r in recs(first)]
    assert not any(r["duplicate"] for r in recs(again))
    # the rest continues where this worker left off: it is not looked up again
    assert asyncio.run(pipeline.next_batch(rest, 100)) == list(range(6))
    assert asyncio.run(pipeline.profiles.stats())["events_applied"] == 6


def test_events_applied_before_a_batch_taken_again_go_first_by_themselves(pipeline):
    """Offsets are committed later than batches are applied: a new worker is handed applied events
    before the batch it must take again. Lists see the batch's own composition (the popular pool
    is as long as its longest seen set needs), so those events go in a batch of their own."""
    jazz = items_of("jazz")
    done = msgs([click(f"a{i}", f"u{i % 3}", jazz[i % 4]) for i in range(5)])
    begun = msgs([click(f"b{i}", f"u{i % 2}", jazz[(i + 1) % 4]) for i in range(4)])
    later = msgs([click(f"c{i}", "u0", jazz[i % 4]) for i in range(3)])
    run_events(pipeline, done)
    first = asyncio.run(pipeline.process_events(begun))  # published, then the worker died
    pipeline.lose_positions()
    held = done + begun + later
    assert asyncio.run(pipeline.next_batch(held, 100)) == list(range(5))  # applied: marked duplicate
    assert all(r["duplicate"] for r in recs(run_events(pipeline, done)))
    held = begun + later
    assert asyncio.run(pipeline.next_batch(held, 100)) == list(range(4))  # exactly the batch begun
    again = run_events(pipeline, begun)
    assert [r["items"] for r in recs(again)] == [r["items"] for r in recs(first)]
    assert not any(r["duplicate"] for r in recs(again))
    assert asyncio.run(pipeline.next_batch(later, 100)) == list(range(3))


def test_a_batch_stopped_between_its_effects_and_its_profiles_applies_each_once(pipeline):
    jazz = items_of("jazz")
    batch = msgs([click("e1", "u", jazz[0]), click("e2", "u", jazz[1])])
    out = asyncio.run(pipeline.process_events(batch))
    asyncio.run(pipeline.profiles.apply(out.effects))  # the worker died before writing the profiles
    again = run_events(pipeline, batch)
    assert all(r["duplicate"] for r in recs(again))  # their lists were out already
    p = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    assert p.clicks == 2 and p.applied.count == 2
    assert popularity(pipeline, jazz[0]) == pytest.approx(1.0) and popularity(pipeline, jazz[1]) == pytest.approx(1.0)
    stats = asyncio.run(pipeline.profiles.stats())
    assert stats["events_applied"] == 2 and stats["events_in"] == 2 and stats["recommendations_out"] == 2


def test_a_forget_in_a_redelivered_batch_neither_loses_nor_repeats_events(pipeline):
    jazz = items_of("jazz")
    batch = msgs([click("e1", "u", jazz[0]), {"type": "forget", "event_id": "e2", "user_id": "u", "timestamp": 1000.0},
                  click("e3", "u", jazz[1])])
    run_events(pipeline, batch)
    after = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    again = run_events(pipeline, batch)
    p = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    assert p.clicks == 1 and [h["item_id"] for h in p.history] == [jazz[1]] and p.version == after.version
    assert (p.applied.count, p.applied.digest) == Applied.expected(["e2", "e3"])  # since the forget
    assert again.stats.get("redelivered") == 3 and all(r["duplicate"] for r in recs(again))
    stats = asyncio.run(pipeline.profiles.stats())
    assert stats["events_applied"] == 2 and stats["users_forgotten"] == 1
    assert popularity(pipeline, jazz[0]) == pytest.approx(1.0)


def test_a_click_on_an_item_not_indexed_waits_for_the_catalog():
    caught_up = [False]

    async def gate():
        return caught_up[0]

    p = make_pipeline()
    p.catalog_caught_up = gate
    run_catalog(p, msgs(CATALOG[:10], "catalog"))
    batch = msgs([click("e1", "u", CATALOG[20]["item_id"]), click("e2", "u", "never-indexed")])
    with pytest.raises(CatalogBehind):  # the agent retries the batch later; nothing is dead-lettered
        asyncio.run(p.process_events(batch))
    run_catalog(p, msgs(CATALOG[10:30], "catalog"))  # the catalog catches up
    caught_up[0] = True
    out = run_events(p, batch)
    assert [r["trigger_event_id"] for r in recs(out)] == ["e1"]
    assert [json.loads(v)["error"] for _, v in out.dead_letters] == ["unknown_item"]


def test_an_unreadable_profile_starts_again_and_is_counted(pipeline, caplog):
    pipeline.profiles.corrupt("u", b"\x00not a profile")
    out = run_events(pipeline, msgs([click("e1", "u", items_of("jazz")[0])]))
    assert out.stats["profiles_reset"] == 1 and out.stats["events_applied"] == 1
    assert "could not be read" in caplog.text
    p = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    assert not p.reset and p.clicks == 1


def test_a_profile_of_another_encoder_keeps_its_history_but_not_its_vectors(pipeline, caplog):
    run_events(pipeline, msgs([click("e1", "u", items_of("jazz")[0])]))
    stored = asyncio.run(pipeline.profiles.load(["u"]))["u"]
    assert stored.encoder == pipeline.encoder.version
    pipeline.encoder.version = "another:64"
    p = asyncio.run(pipeline.load_profiles(["u"]))["u"]
    assert p.long is None and p.short is None and p.seen == stored.seen and p.history == stored.history
    assert "holds vectors of encoder" in caplog.text


def test_a_query_waits_behind_one_catalog_chunk_not_the_whole_catalog_batch():
    """The encoder runs one job at a time: catalog texts go in chunks of its batch size, so a
    query's text submitted during catalog ingest is encoded after the chunk in progress."""
    import threading

    class Recording(WordHashEncoder):
        batch_size = 16

        def __init__(self):
            self.calls: list[int] = []
            self.first_chunk_started = threading.Event()
            self.query_submitted = threading.Event()

        def encode(self, texts):
            self.calls.append(len(texts))
            if len(self.calls) == 1:
                self.first_chunk_started.set()
                assert self.query_submitted.wait(10)
            return super().encode(texts)

    enc = Recording()
    p = Pipeline(open_profile_store("memory://"), open_item_index("memory://", enc.dim), enc, ModelParams(),
                 Limits(), k=5, item_cache=ItemCache(100, 60.0), clock=lambda: CLOCK[0])
    from schemas.validate import parse_catalog

    whole = WordHashEncoder().encode([parse_catalog(json.dumps(it).encode(), Limits(), CLOCK[0]).text()
                                      for it in CATALOG[:64]])
    query = msgs([{"type": "query", "event_id": "q-during", "user_id": "qq", "text": "jazz piano", "timestamp": 1.0}])

    # the first catalog chunk is held until the next encoder job is submitted: the query's, since
    # the catalog submits its next chunk only once the first is done
    submit, jobs = p._encode_executor.submit, []

    def submitted(*args, **kwargs):
        jobs.append(submit(*args, **kwargs))
        if len(jobs) == 2:
            enc.query_submitted.set()
        return jobs[-1]

    p._encode_executor.submit = submitted

    async def go():
        catalog = asyncio.ensure_future(p.process_catalog(msgs(CATALOG[:64], "catalog")))
        await asyncio.to_thread(enc.first_chunk_started.wait, 10)
        events = asyncio.ensure_future(p.process_events(query))
        return await catalog, await events

    cat_out, ev_out = asyncio.run(go())
    assert enc.calls == [16, 1, 16, 16, 16]  # the query after the first chunk, not after all 64 texts
    assert cat_out.stats["items_upserted"] == 64 and len(ev_out.recommendations) == 1
    got = p.items.get([it["item_id"] for it in CATALOG[:64]])
    assert np.allclose(np.stack([got[it["item_id"]].vector for it in CATALOG[:64]]), whole)


def test_close_closes_the_stores_the_other_clients_and_the_pools_even_when_one_fails():
    p = make_pipeline()
    closed = []

    async def profiles_close():
        closed.append("profiles")

    def failing():
        closed.append("gate")
        raise RuntimeError("already closed")

    p.profiles._target.close = profiles_close
    p.items._target.close = lambda: closed.append("items")
    p.closers += [failing, lambda: closed.append("other")]
    asyncio.run(p.close())
    assert closed == ["profiles", "items", "gate", "other"]
    with pytest.raises(RuntimeError):  # the pools take no more work
        p.executor.submit(print)


def test_search_limit_is_what_a_list_keeps_and_what_its_first_search_asks(monkeypatch):
    """One place says how many hits a list's search asks: the pipeline and the bench's Milvus limit use it."""
    import streams.pipeline
    from streams.pipeline import search_limit

    assert search_limit(10, 2) == (20, 32)
    assert search_limit(10, 1) == (10, 16)  # a list keeps as many as it has slots; searches ask multiples of 8
    assert search_limit(10, 1, excluded=7) == (17, 32)  # excluded items are fetched on top
    monkeypatch.setattr(streams.pipeline, "PROBE", 2)
    assert search_limit(10, 1) == (10, 24)


@pytest.mark.parametrize("co", [True, False])
def test_behaviour_sums_read_by_id_match_a_plain_loop(co):
    """A list's co-click (or step) sums and strongest sources, read lazily by item id, are what a
    loop over its sources gives: the sum in the sources' order, the first source of equal ones."""
    import random

    from models.ranking import Candidate
    from streams.pipeline import _From, _Row, _Summed, _Sums

    rng = random.Random(7 if co else 8)
    known = {f"i{n}": Candidate(f"i{n}", 0.0, title=f"title {n}", no=n) for n in range(60)}
    sources = ["i1", "i2", "i3", "i4"]
    scale = (lambda pos: 1.0) if co else (lambda pos: 1.0 / (pos + 1))
    parts = []
    for pos in range(len(sources)):
        nos = rng.sample(range(60), 25)
        vals = [rng.choice([0.5, 1.0, 0.25, rng.random()]) for _ in nos]  # equal values on purpose
        parts.append((pos, _Row(np.array(nos, dtype=np.int64), np.array(vals, dtype=np.float64)), 1.0))
    nos = np.concatenate([r.nos for _, r, _ in parts])
    vals = np.concatenate([r.vals * scale(pos) for pos, r, _ in parts])
    uniq, inv = np.unique(nos, return_inverse=True)
    summed = _Summed(uniq, uniq.tolist(), np.bincount(inv, weights=vals), parts, scale, sources, known)
    sums, names = _Sums(summed), _From(summed)

    want_sum: dict[str, float] = {}
    want_from: dict[str, tuple[float, str]] = {}
    for pos, row, _ in parts:
        for no, v in zip(row.nos.tolist(), row.vals.tolist()):
            y, v = f"i{no}", v * scale(pos)
            want_sum[y] = want_sum.get(y, 0.0) + v
            if y not in want_from or v > want_from[y][0]:
                want_from[y] = (v, sources[pos])
    assert len(sums) == len(want_sum) and set(sums) == set(want_sum)
    for y in known:
        assert sums.get(y, 0.0) == want_sum.get(y, 0.0)
        assert (y in names) == (y in want_from)
        if y in want_from:
            assert names[y] == known[want_from[y][1]].title
    ids = list(known) + ["not-an-item"]
    assert sums.many(ids).tolist() == [want_sum.get(y, 0.0) for y in ids]
    assert "not-an-item" not in sums and sums.get("not-an-item", -1.0) == -1.0


@pytest.mark.parametrize("top", [50, 10_000_000])  # pairs counted, and sorted
def test_grouped_sums_add_each_lists_partners_in_input_order(top):
    """Each (list, partner) sum is exactly what a loop over that list's rows in order adds,
    whichever way the pairs are grouped, and whatever other lists share the call."""
    from streams.pipeline import grouped_sums

    rng = np.random.default_rng(top)
    sizes = [5, 0, 400, 1, 23]
    pick = (lambda n: rng.integers(0, top, size=n)) if top < 1000 else \
        (lambda n: rng.choice([3, 17, top - 1, 5_000_000], size=n))
    nos = [pick(n).astype(np.int64) for n in sizes]
    vals = [rng.choice([0.1, 0.2, 0.3, 1 / 3, 1e-9, 7.0], size=n) for n in sizes]  # sums that depend on the order
    group, uniq, sums = grouped_sums(np.repeat(np.arange(len(sizes), dtype=np.int64), sizes),
                                     np.concatenate(nos), np.concatenate(vals))
    for g in range(len(sizes)):
        want: dict[int, float] = {}
        for no, v in zip(nos[g].tolist(), vals[g].tolist()):
            want[no] = want.get(no, 0.0) + v
        assert uniq[group == g].tolist() == sorted(want)
        assert sums[group == g].tolist() == [want[no] for no in sorted(want)]


def test_query_texts_encoded_ahead_are_used_only_for_exactly_their_batch():
    """A batch whose query texts were encoded while the batch before it ran makes the same lists
    as without; a batch with other texts encodes its own (and the metric counts both)."""
    def queries(prefix, n):
        return [{"type": "query", "event_id": f"{prefix}{i}", "user_id": f"u{i % 3}", "text": f"space robots {i}",
                 "timestamp": 1000.0} for i in range(n)]

    def lists(out):
        return [json.loads(v)["items"] for _, v in out.recommendations]

    calls: list[list[str]] = []
    plain, ahead = make_pipeline(), make_pipeline()
    for p in (plain, ahead):
        run_catalog(p, msgs(CATALOG, topic="catalog"))
        inner = p.encoder._target.encode
        p.encoder._target.encode = lambda texts, inner=inner: calls.append(list(texts)) or inner(texts)
    batch = msgs(queries("a", 6))
    want = run_events(plain, batch)

    async def with_prefetch(p, batch, shown):
        p.prefetch(shown)
        out = await p.process_events(batch)
        await p.commit(out)
        return out

    calls.clear()
    got = asyncio.run(with_prefetch(ahead, batch, batch))
    assert lists(got) == lists(want)
    assert calls == [[f"space robots {i}" for i in range(6)]]  # encoded once, ahead of its batch
    other = msgs(queries("b", 4))
    calls.clear()
    asyncio.run(with_prefetch(ahead, other, other[:3]))  # its batch grew: encoded again, whole
    assert sorted(calls) == [[f"space robots {i}" for i in range(n)] for n in (3, 4)]
    samples = {s.labels["outcome"]: s.value for m in ahead.metrics.registry.collect()
               if m.name == "streamrec_query_prefetch" for s in m.samples if s.name.endswith("_total")}
    assert samples == {"hit": 6.0, "miss": 4.0}  # texts


def test_query_chunks_encoded_ahead_of_a_batch_that_grows_are_used():
    """Events held behind the running batch, fewer than a full batch: only whole encoder chunks
    of their query texts are encoded ahead, and a batch that then takes more events uses those
    chunks and encodes the rest itself, with the same lists as without any of it."""
    def queries(n):
        return [{"type": "query", "event_id": f"g{i}", "user_id": f"u{i % 4}", "text": f"jazz robots {i}",
                 "timestamp": 1000.0} if i != 3 else click(f"g{i}", "u1", CATALOG[5]["item_id"]) for i in range(n)]

    calls: list[list[str]] = []
    plain, ahead = make_pipeline(), make_pipeline()
    for p in (plain, ahead):
        run_catalog(p, msgs(CATALOG, topic="catalog"))
        p.encoder._target.batch_size = 2
        inner = p.encoder._target.encode
        p.encoder._target.encode = lambda texts, inner=inner: calls.append(list(texts)) or inner(texts)
    batch = msgs(queries(9))  # 8 queries and a click
    want = run_events(plain, batch)

    async def grown():
        ahead.prefetch(batch[:6], whole=False)  # queries 0, 1, 2, 4, 5: two whole chunks
        out = await ahead.process_events(batch)
        await ahead.commit(out)
        return out

    calls.clear()
    got = asyncio.run(grown())
    assert [json.loads(v)["items"] for _, v in got.recommendations] == \
        [json.loads(v)["items"] for _, v in want.recommendations]
    texts = [f"jazz robots {i}" for i in (0, 1, 2, 4, 5, 6, 7, 8)]
    # each text encoded once: two chunks ahead, two by the batch (whose own go first when queued)
    assert sorted(calls) == [texts[0:2], texts[2:4], texts[4:6], texts[6:8]]
    samples = {s.labels["outcome"]: s.value for m in ahead.metrics.registry.collect()
               if m.name == "streamrec_query_prefetch" for s in m.samples if s.name.endswith("_total")}
    assert samples == {"hit": 4.0, "miss": 4.0}


def test_a_large_batch_keeps_every_chunk_encoded_ahead():
    """More encoder chunks wait than the default keeps (batches larger than 256 events): every
    chunk of the batch behind the running one stays encoded ahead for it."""
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, topic="catalog"))
    p.encoder._target.batch_size = 2
    batch = msgs([{"type": "query", "event_id": f"big{i}", "user_id": f"u{i % 5}", "text": f"jazz night {i}",
                   "timestamp": 1000.0} for i in range(30)])  # 15 chunks

    async def go():
        p.prefetch(batch)
        return await p.process_events(batch)

    assert len(asyncio.run(go()).recommendations) == 30
    samples = {s.labels["outcome"]: s.value for m in p.metrics.registry.collect()
               if m.name == "streamrec_query_prefetch" for s in m.samples if s.name.endswith("_total")}
    assert samples == {"hit": 30.0, "miss": 0.0}


def _lookahead_events():
    """Clicks, queries and a forget of a few users, each user in several consecutive batches."""
    cats = ["jazz", "cooking", "travel", "jazz", "cooking"]
    events = []
    for n in range(42):
        user = f"u{n % 4}"
        if n == 20:  # forgotten in the middle of the stream, then clicking again
            events.append({"type": "forget", "event_id": f"f{n}", "user_id": user, "timestamp": 1000.0 + n})
        elif n % 9 == 4:
            events.append({"type": "query", "event_id": f"q{n}", "user_id": user, "text": f"{cats[n % 5]} tonight",
                           "timestamp": 1000.0 + n, "scene": "tv"})
        else:
            events.append(click(f"c{n}", user, items_of(cats[n % 5])[n % 7], scene="tv" if n % 3 else "mobile"))
    return [events[i:i + 6] for i in range(0, len(events), 6)]


def _ahead_counts(p):
    return {o: p.metrics.lookahead.labels(o)._value.get() for o in ("hit", "miss")}


async def _stream(p, batches, ahead, between=None):
    """Each batch processed and committed in turn, with the next one held behind it (``ahead``)."""
    lists, hits = [], []
    for n, batch in enumerate(batches):
        nxt = batches[n + 1] if ahead and n + 1 < len(batches) else None
        p.upcoming = (lambda nxt=nxt: nxt) if nxt else None
        if nxt:
            p.prefetch(nxt)
        out = await p.process_events(batch)
        await p.commit(out)
        if between and n in between:
            await p.commit(await p.process_catalog(between[n]))
        lists += [{k: v for k, v in r.items() if k != "produced_time"} for r in recs(out)]
        hits.append(_ahead_counts(p)["hit"] - sum(hits))
    return lists, hits


@pytest.mark.parametrize("exclude_in_index", [64, 1])
def test_searches_done_ahead_change_no_list_and_serve_the_next_batch(monkeypatch, exclude_in_index):
    """The next batch's index searches, done while the batch before it runs from the profiles that
    batch leaves, give every list exactly what its own search would (seen items over-fetched or
    excluded in the index), and every list after the first batch takes its hits from them."""
    import streams.pipeline

    monkeypatch.setattr(streams.pipeline, "EXCLUDE_IN_INDEX", exclude_in_index)
    batches = [msgs(b) for b in _lookahead_events()]
    got = {}
    for ahead in (False, True):
        p = make_pipeline()
        run_catalog(p, msgs(CATALOG, "catalog"))
        lists, hits = asyncio.run(_stream(p, batches, ahead))
        got[ahead] = (lists, hits, _ahead_counts(p))
    assert got[True][0] == got[False][0]
    assert got[False][2] == {"hit": 0, "miss": 0}
    assert got[True][2]["miss"] == 0
    assert got[True][1][0] == 0 and all(h >= len(b) for h, b in zip(got[True][1][1:], batches[1:]))


def test_searches_done_ahead_are_not_used_once_the_item_index_is_written():
    """A catalog write between a search done ahead and its batch: that batch searches again, and
    its lists see the new item as they would without searching ahead."""
    batches = [msgs(b) for b in _lookahead_events()[:3]]
    new = {**next(it for it in CATALOG if it["category"] == "jazz"), "item_id": "jazz-new"}  # a twin of a clicked one
    got = {}
    for ahead in (False, True):
        p = make_pipeline()
        run_catalog(p, msgs(CATALOG, "catalog"))
        between = {0: [RawMessage("catalog", 0, 10_000, None, json.dumps(new).encode())]}
        got[ahead] = asyncio.run(_stream(p, batches, ahead, between))
    assert got[True][0] == got[False][0]
    assert any("jazz-new" in [i["item_id"] for i in r["items"]] for r in got[True][0])
    assert got[True][1][1] == 0 and got[True][1][2] >= len(batches[2])  # the batch after the write searched itself


def test_a_failure_to_search_ahead_never_fails_a_batch(pipeline):
    """What is held behind a batch cannot be read, or its searches fail: the batch runs as usual."""
    batches = [msgs(b) for b in _lookahead_events()[:3]]

    def broken():
        raise RuntimeError("held events unreadable")

    async def go():
        lists = []
        for n, batch in enumerate(batches):
            pipeline.upcoming = broken if n == 0 else (lambda n=n: [*batches[n + 1], RawMessage("events", 0, 99, None, b"{")]
                                                         if n + 1 < len(batches) else [])
            out = await pipeline.process_events(batch)
            await pipeline.commit(out)
            lists += recs(out)
        return lists

    got = asyncio.run(go())
    assert sorted(r["trigger_event_id"] for r in got) == sorted(e["event_id"] for b in _lookahead_events()[:3]
                                                                for e in b if e["type"] != "forget")
    assert _ahead_counts(pipeline)["hit"] > 0  # the bad message held behind is skipped, the rest searched


def test_a_list_sees_the_co_clicks_and_steps_of_other_users_clicks_earlier_in_its_batch(monkeypatch):
    """With ``fresh_behaviour``, another user's clicks earlier in the same batch count in a list's
    co-clicks and steps as they would had they come in a batch before it (the same partners, the
    same scores to rounding, the same reasons); a click later in the batch counts for no list
    before it."""
    import streams.pipeline

    items = [it["item_id"] for it in CATALOG]
    sums: dict[str, dict[str, tuple[float, float]]] = {}
    real_rank = streams.pipeline.rank_many

    def spy(jobs, *args, **kw):
        for job in jobs:
            s = job.signals
            sums[job.profile.user_id] = {i: (s.cooccur.get(i, 0.0), s.transitions.get(i, 0.0)) for i in items
                                         if s.cooccur.get(i, 0.0) or s.transitions.get(i, 0.0)}
        return real_rank(jobs, *args, **kw)

    monkeypatch.setattr(streams.pipeline, "rank_many", spy)
    a, b, c, d = items[30], items[31], items[32], items[33]
    # before: a crowd clicks a then d, so u's a has partners of its own in the store
    crowd = [e for m in range(3) for e in (click(f"ca{m}", f"crowd{m}", a), click(f"cd{m}", f"crowd{m}", d))]
    # v clicks a, b and d (co-clicks and steps among them; a and d gain clicks), u then clicks a,
    # and v clicks c after that
    v1, v2, v3, u1, v4 = (click("v1", "v", a), click("v2", "v", b), click("v3", "v", d), click("u1", "u", a),
                          click("v4", "v", c))
    got = {}
    for name, batches in (("one batch", [[v1, v2, v3, u1, v4]]), ("v first", [[v1, v2, v3], [u1, v4]])):
        p = make_pipeline(signals_off="text,popularity", fresh_behaviour=True)
        run_catalog(p, msgs(CATALOG, "catalog"))
        run_events(p, msgs(crowd))
        for batch in batches:
            out = run_events(p, msgs(batch))
        got[name] = (sums["u"], [(i["item_id"], i["reason"]) for r in recs(out) if r["user_id"] == "u"
                                 for i in r["items"] if i["item_id"] in (b, c, d)])
    (one, one_items), (apart, apart_items) = got["one batch"], got["v first"]
    assert set(one) == set(apart) == {b, d}  # c is clicked after u's list: never its partner
    for i in one:
        assert one[i] == pytest.approx(apart[i], rel=1e-6)
    assert one[b][0] > 0 and one[b][1] > 0  # b is both co-clicked with a and clicked after it
    assert one_items == apart_items and b in [i for i, _ in one_items]


def test_co_clicks_add_behaviour_oversample_candidates_per_slot(monkeypatch):
    """Co-clicked items (and here the same items as steps) join a list's candidates ``k *
    behaviour_oversample`` deep, the best by their summed score, then by id."""
    import streams.pipeline

    items = [it["item_id"] for it in CATALOG]
    ranked: dict[str, tuple[set[str], dict[str, float]]] = {}
    real_rank = streams.pipeline.rank_many

    def spy(jobs, *args, **kw):
        for job in jobs:
            job.candidates = list(job.candidates)
            ranked[job.profile.user_id] = ({c.item_id for c in job.candidates},
                                           {i: job.signals.cooccur.get(i, 0.0) for i in items})
        return real_rank(jobs, *args, **kw)

    monkeypatch.setattr(streams.pipeline, "rank_many", spy)
    anchor, partners = items[0], items[1:41]
    # partner n is clicked after the anchor by n % 6 + 1 users: 40 partners of six strengths
    crowd = [e for n, y in enumerate(partners) for m in range(n % 6 + 1)
             for e in (click(f"a{n}-{m}", f"c{n}-{m}", anchor), click(f"p{n}-{m}", f"c{n}-{m}", y))]
    taken = {}
    for over in (1, 3):
        p = make_pipeline(behaviour_oversample=over, signals_off="text,popularity")
        run_catalog(p, msgs(CATALOG, "catalog"))
        run_events(p, msgs(crowd))
        run_events(p, msgs([click(f"u-{over}", "u", anchor)]))
        got, sums = ranked["u"]
        best = sorted((i for i in items if sums[i] > 0), key=lambda i: (-sums[i], i))
        assert len(best) == 40
        taken[over] = got
        assert got == set(best[:5 * over])  # k = 5; text and popularity add none here
    assert taken[1] < taken[3]
