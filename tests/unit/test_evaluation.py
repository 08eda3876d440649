"""Scoring and baselines: the sanity checks every evaluation must pass."""

from __future__ import annotations

import math
import random

import pytest

from models.baselines import ItemKnnBaseline, OracleBaseline, PopularityBaseline, RandomBaseline
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


def test_popularity_and_knn_beat_random_on_skewed_structured_data():
    rng = random.Random(7)
    groups = [[f"g{g}-{n}" for n in range(20)] for g in range(5)]
    events = []
    for t in range(10):
        for u in range(100):
            items = groups[u % 5]
            events.append({"type": "click", "user_id": f"u{u}", "item_id": items[min(int(rng.expovariate(0.3)), 19)],
                           "timestamp": float(t * 100 + u)})
    catalog = [i for g in groups for i in g]
    res = evaluate_stream(events, [RandomBaseline(), PopularityBaseline(), PopularityBaseline(halflife_s=500.0),
                                   ItemKnnBaseline()], 10, catalog)
    assert res["item_knn"]["hr"] > res["popularity"]["hr"] > res["random"]["hr"]
    assert res["recent_popularity"]["hr"] > res["random"]["hr"]
    for r in res.values():
        assert 0 < r["coverage"] <= 1 and r["segments"]["2-5"]["events_scored"] + r["segments"]["6+"]["events_scored"] == r["events_scored"] - 100


def test_seen_items_are_never_recommended_by_any_baseline():
    events = clicks(3, 12, 8)
    seen: dict[str, set] = {}
    systems = [RandomBaseline(), PopularityBaseline(), PopularityBaseline(halflife_s=10.0), ItemKnnBaseline()]
    for s in systems:
        s.add_items([f"i{n}" for n in range(12)])
    for e in events:
        for s in systems:
            s.update(e["user_id"], e["item_id"], e["timestamp"])
        seen.setdefault(e["user_id"], set()).add(e["item_id"])
        for s in systems:
            rec = s.recommend(e["user_id"], 5, seen[e["user_id"]])
            assert not set(rec) & seen[e["user_id"]] and len(rec) == len(set(rec))


def test_recent_popularity_forgets_old_clicks():
    p = PopularityBaseline(halflife_s=1.0)
    for _ in range(5):
        p.update("u", "old", 0.0)
    p.update("u", "new", 10.0)  # 5 clicks, 10 half-lives ago, weigh 5/1024 of one now
    assert p.recommend("x", 2, set()) == ["new", "old"]
    p.update("u", "later", 10_000.0)  # far ahead: scores rescale and stay finite
    assert p.recommend("x", 1, set()) == ["later"] and all(math.isfinite(v) for v in p.score.values())
