"""Scoring and baselines: the sanity checks every evaluation must pass."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from models.baselines import (ImplicitALSBaseline, ItemKnnBaseline, OracleBaseline, PopularityBaseline,
                              RandomBaseline, RiverMFBaseline)
from models.evaluation import Scorer, evaluate_stream, rank_of, segment_of


def clicks(n_users: int, n_items: int, per_user: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for t in range(per_user):
        for u in range(n_users):
            out.append({"type": "click", "user_id": f"u{u}", "item_id": f"i{rng.randrange(n_items)}",
                        "timestamp": float(t * n_users + u)})
    return out


def test_rank_and_segments():
    assert rank_of(["a", "b", "c"], "b", 10) == 2 and rank_of(["a", "b"], "b", 1) is None
    assert [segment_of(h) for h in (0, 1, 2, 5, 6, 50)] == [None, None, "2-5", "2-5", "6+", "6+"]


def test_a_system_shown_the_answer_scores_one_and_an_empty_list_zero():
    s = Scorer(k=10, catalog_size=100)
    for n in range(50):
        s.score([f"i{n}"], f"i{n}", history=3)
    r = s.result()
    assert r["hr"] == r["ndcg"] == r["mrr"] == 1.0 and r["segments"]["2-5"]["hr"] == 1.0
    empty = Scorer(k=10, catalog_size=100)
    for n in range(50):
        empty.score([], f"i{n}", history=8)
    assert empty.result()["hr"] == empty.result()["mrr"] == 0.0 and empty.result()["coverage"] == 0.0


def test_ndcg_and_mrr_follow_the_rank():
    s = Scorer(k=10, catalog_size=10)
    s.score(["x", "y", "t"], "t", history=2)
    r = s.result()
    assert r["mrr"] == pytest.approx(1 / 3) and r["ndcg"] == pytest.approx(1 / math.log2(4))


def test_oracle_through_the_stream_scores_one():
    events = clicks(5, 50, 6)
    # after each event the oracle is asked for that user's list: it answers the user's next click
    answers = [next((f["item_id"] for f in events[i + 1:] if f["user_id"] == e["user_id"]), "none")
               for i, e in enumerate(events)]
    res = evaluate_stream(events, [OracleBaseline(answers)], 10, [f"i{n}" for n in range(50)])
    assert res["oracle"]["hr"] == 1.0 and res["oracle"]["events_scored"] == 25


def test_random_hits_about_k_over_the_unseen_items():
    n_items, k = 200, 10
    events = clicks(200, n_items, 6, seed=3)
    res = evaluate_stream(events, [RandomBaseline(seed=5)], k, [f"i{n}" for n in range(n_items)])["random"]
    # expected: mean over scored clicks of k / (unseen items), about 10 / 197; ~1000 clicks scored
    expected = k / (n_items - 3)
    assert res["events_scored"] == 1000
    assert abs(res["hr"] - expected) < 4 * math.sqrt(expected * (1 - expected) / 1000)


def grouped_clicks(seed: int = 7) -> tuple[list[dict], list[str], list[list[str]]]:
    """100 users in 5 groups of 20 items, each clicking its group's items with a skew."""
    rng = random.Random(seed)
    groups = [[f"g{g}-{n}" for n in range(20)] for g in range(5)]
    events = []
    for t in range(10):
        for u in range(100):
            items = groups[u % 5]
            events.append({"type": "click", "user_id": f"u{u}", "item_id": items[min(int(rng.expovariate(0.3)), 19)],
                           "timestamp": float(t * 100 + u)})
    return events, [i for g in groups for i in g], groups


def test_popularity_knn_and_factorisations_beat_random_on_skewed_structured_data():
    events, catalog, _ = grouped_clicks()
    res = evaluate_stream(events, [RandomBaseline(), PopularityBaseline(), PopularityBaseline(halflife_s=500.0),
                                   ItemKnnBaseline(), RiverMFBaseline(), ImplicitALSBaseline(retrain_every=200)],
                          10, catalog)
    assert res["item_knn"]["hr"] > res["popularity"]["hr"] > res["random"]["hr"]
    assert res["recent_popularity"]["hr"] > res["random"]["hr"]
    assert res["river_mf"]["hr"] > res["random"]["hr"] and res["implicit_als"]["hr"] > res["random"]["hr"]
    for r in res.values():
        assert 0 < r["coverage"] <= 1 and r["segments"]["2-5"]["events_scored"] + r["segments"]["6+"]["events_scored"] == r["events_scored"] - 100


def test_seen_items_are_never_recommended_by_any_baseline():
    events = clicks(3, 12, 8)
    seen: dict[str, set] = {}
    systems = [RandomBaseline(), PopularityBaseline(), PopularityBaseline(halflife_s=10.0), ItemKnnBaseline(),
               RiverMFBaseline(), ImplicitALSBaseline(retrain_every=5)]
    for s in systems:
        s.add_items([f"i{n}" for n in range(12)])
    for e in events:
        for s in systems:
            s.update(e["user_id"], e["item_id"], e["timestamp"])
        seen.setdefault(e["user_id"], set()).add(e["item_id"])
        for s in systems:
            rec = s.recommend(e["user_id"], 5, seen[e["user_id"]])
            assert not set(rec) & seen[e["user_id"]] and len(rec) == len(set(rec))
            assert len(rec) == min(5, 12 - len(seen[e["user_id"]])), s.name


def test_recent_popularity_forgets_old_clicks():
    p = PopularityBaseline(halflife_s=1.0)
    for _ in range(5):
        p.update("u", "old", 0.0)
    p.update("u", "new", 10.0)  # 5 clicks, 10 half-lives ago, weigh 5/1024 of one now
    assert p.recommend("x", 2, set()) == ["new", "old"]
    p.update("u", "later", 10_000.0)  # far ahead: scores rescale and stay finite
    assert p.recommend("x", 1, set()) == ["later"] and np.isfinite(p.counts).all()


def test_items_met_only_in_updates_join_every_system():
    systems = [RandomBaseline(), PopularityBaseline(), ItemKnnBaseline(), RiverMFBaseline(),
               ImplicitALSBaseline(retrain_every=3)]
    for s in systems:
        s.add_items(["a", "b"])
        for n, item in enumerate(["a", "new", "b", "newer"]):
            s.update("u", item, float(n))
        assert sorted(s.recommend("v", 10, {"a"})) == ["b", "new", "newer"], s.name
        assert s.recommend("u", 10, {"a", "b", "new", "newer"}) == [], s.name


def test_factorisations_are_deterministic_for_a_seed():
    events, catalog, _ = grouped_clicks(seed=11)
    events = events[:400]

    def lists(make):
        out = []
        s = make()
        s.add_items(catalog)
        seen: dict[str, set] = {}
        for e in events:
            s.update(e["user_id"], e["item_id"], e["timestamp"])
            seen.setdefault(e["user_id"], set()).add(e["item_id"])
            out.append(s.recommend(e["user_id"], 10, seen[e["user_id"]]))
        return out

    for make in (lambda: RiverMFBaseline(seed=3), lambda: ImplicitALSBaseline(retrain_every=100, seed=3),
                 lambda: RandomBaseline(seed=3)):
        assert lists(make) == lists(make)


def test_implicit_als_retrains_on_schedule_and_uses_clicks_after_the_last_fit():
    events, catalog, groups = grouped_clicks()
    als = ImplicitALSBaseline(retrain_every=150, factors=16)
    als.add_items(catalog)
    assert als.recommend("u0", 10, set()) == als.recommend("nobody", 10, set())  # popularity before any fit
    for e in events[:700]:
        als.update(e["user_id"], e["item_id"], e["timestamp"])
    assert als.trainings == 4 and als.clicks == 700
    # a new user: popularity at first, then the group of the item clicked
    popular = als.recommend("newcomer", 10, set())
    als.update("newcomer", groups[3][5], 701.0)
    mine = als.recommend("newcomer", 10, {groups[3][5]})
    assert sum(i in groups[3] for i in mine) >= max(5, sum(i in groups[3] for i in popular) + 3)
    # a known user's list moves when they click into another group, before any retraining
    before = als.recommend("u0", 10, set())
    for n in range(5):
        als.update("u0", groups[2][n], 702.0 + n)
    after = als.recommend("u0", 10, set())
    assert als.trainings == 4 and after != before
    assert sum(i in groups[2] for i in after) > sum(i in groups[2] for i in before)


def test_item_knn_refuses_a_catalog_too_large_for_its_dense_matrix():
    knn = ItemKnnBaseline(max_items=1000)
    with pytest.raises(ValueError, match="GB"):
        knn.add_items(f"i{n}" for n in range(1001))
    knn.add_items(f"i{n}" for n in range(1000))
    with pytest.raises(ValueError, match="max_items"):
        knn.update("u", "one too many", 0.0)
