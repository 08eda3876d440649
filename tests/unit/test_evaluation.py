"""Scoring and baselines: the sanity checks every evaluation must pass."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from models.baselines import (EaseBaseline, ImplicitALSBaseline, ItemKnnBaseline, OracleBaseline, PopularityBaseline,
                              RandomBaseline, RiverMFBaseline, SequentialRulesBaseline, SessionKnnBaseline)
from models.evaluation import SEGMENT_NAMES, Scorer, evaluate_stream, rank_of, segment_of


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
                                   ItemKnnBaseline(), RiverMFBaseline(), ImplicitALSBaseline(retrain_every=200),
                                   SequentialRulesBaseline(), SessionKnnBaseline(), EaseBaseline(refit_every=200)],
                          10, catalog)
    assert res["item_knn"]["hr"] > res["popularity"]["hr"] > res["random"]["hr"]
    for name in ("sequential_rules", "session_knn", "ease"):
        assert res[name]["hr"] > res["popularity"]["hr"], name
    assert res["recent_popularity"]["hr"] > res["random"]["hr"]
    assert res["river_mf"]["hr"] > res["random"]["hr"] and res["implicit_als"]["hr"] > res["random"]["hr"]
    for r in res.values():
        assert 0 < r["coverage"] <= 1 and r["segments"]["2-5"]["events_scored"] + r["segments"]["6+"]["events_scored"] == r["events_scored"] - 100


def test_seen_items_are_never_recommended_by_any_baseline():
    events = clicks(3, 12, 8)
    seen: dict[str, set] = {}
    systems = [RandomBaseline(), PopularityBaseline(), PopularityBaseline(halflife_s=10.0), ItemKnnBaseline(),
               RiverMFBaseline(), ImplicitALSBaseline(retrain_every=5), SequentialRulesBaseline(),
               SessionKnnBaseline(m=4, n=3), EaseBaseline(refit_every=5, min_clicks=1)]
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
               ImplicitALSBaseline(retrain_every=3), SequentialRulesBaseline(), SessionKnnBaseline(),
               EaseBaseline(refit_every=3, min_clicks=1)]
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


@pytest.mark.parametrize("dense", [ItemKnnBaseline, SequentialRulesBaseline])
def test_dense_item_matrices_refuse_a_catalog_too_large(dense):
    knn = dense(max_items=1000)
    with pytest.raises(ValueError, match="GB"):
        knn.add_items(f"i{n}" for n in range(1001))
    knn.add_items(f"i{n}" for n in range(1000))
    with pytest.raises(ValueError, match="max_items"):
        knn.update("u", "one too many", 0.0)


def feed(system, stream: list[tuple[str, str]], catalog=()) -> None:
    system.add_items(catalog)
    for n, (user, item) in enumerate(stream):
        system.update(user, item, float(n))


def test_sequential_rules_follow_directed_transitions_weighted_by_gap():
    sr = SequentialRulesBaseline(window=2)
    feed(sr, [("u1", "A"), ("u1", "B"), ("u1", "C"), ("u2", "A"), ("u2", "B"), ("u2", "C"), ("u3", "A"),
              ("u3", "B"), ("u4", "A"), ("u4", "A"), ("u4", "D"), ("u4", "E"), ("u4", "B")])
    rule = lambda i, j: float(sr.rules[sr.items.pos[i], sr.items.pos[j]])
    # gap 1 adds 1, gap 2 adds 1/2, gap 3 is outside the window of 2; nothing leads to itself
    assert rule("A", "B") == 3.0 and rule("B", "C") == 2.0 and rule("A", "C") == 1.0
    assert rule("E", "B") == 1.0 and rule("D", "B") == 0.5 and rule("A", "D") == 1.5
    assert rule("A", "A") == 0.0 and rule("B", "A") == 0.0 and rule("C", "B") == 0.0
    sr.update("x", "A", 99.0)
    assert sr.recommend("x", 3, {"A"}) == ["B", "D", "C"]
    # directed: after B comes C, although A is more clicked (A only follows by popularity)
    sr.update("y", "B", 100.0)
    assert sr.recommend("y", 2, {"B"}) == ["C", "A"]


def test_sequential_rules_score_from_the_last_recent_clicks_weighted_by_position_if_asked():
    stream = [(f"u{n}", item) for n in range(3) for item in ("A", "B")]  # A -> B three times
    stream += [(f"v{n}", item) for n in range(2) for item in ("C", "D")]  # C -> D twice
    stream += [(f"p{n}", "P") for n in range(5)] + [("x", "A"), ("x", "C")]  # P: popular, no rule
    lists = {}
    for recent, weighted in ((1, False), (3, False), (3, True)):
        sr = SequentialRulesBaseline(recent=recent, position_weighted=weighted)
        feed(sr, stream)
        lists[recent, weighted] = sr.recommend("x", 2, {"A", "C"})
    assert lists[1, False] == ["D", "P"]  # A is not among the last 1: B only by popularity, after P
    assert lists[3, False] == ["B", "D"]  # B 3, D 2
    assert lists[3, True] == ["D", "B"]  # A, one step further back, weighs 1/2: B 1.5, D 2


def test_session_knn_recommends_what_the_most_similar_recent_users_clicked():
    groups = [["A", "B", "C"], ["E", "F", "G"]]
    stream = [(f"g{g}u{u}", item) for u in range(3) for g in range(2) for item in groups[g]]
    stream += [(f"extra{u}", item) for u in range(5) for item in ("E", "F", "G")]  # group 1 more popular
    sk = SessionKnnBaseline(n=2)
    feed(sk, stream)
    sk.update("x", "A", 100.0)
    assert sk.recommend("x", 2, {"A"}) == ["B", "C"]  # only group 0 users share A
    neighbours, sim = sk._neighbours(sk.users["x"])
    assert {name for name, u in sk.users.items() if u in neighbours} == {"g0u0", "g0u1", "g0u2"}
    assert np.allclose(sim, 1 / np.sqrt(3))  # A (the newest: weight 1) shared, over sqrt(3 recent items)
    # the newest click weighs 1, the one before 1/2: E's group comes first, A's next
    sk.update("x", "E", 101.0)
    neighbours, sim = sk._neighbours(sk.users["x"])
    assert sorted(np.round(sim * np.sqrt(3), 6).tolist()) == [0.5] * 3 + [1.0] * 8
    assert set(sk.recommend("x", 2, {"A", "E"})) == {"F", "G"}
    assert set(sk.recommend("x", 4, {"A", "E"})) == {"B", "C", "F", "G"}


def test_session_knn_keeps_the_last_m_items_and_sample_users_per_item():
    sk = SessionKnnBaseline(m=2, sample=2)
    feed(sk, [("u", "A"), ("u", "B"), ("u", "C"), ("v", "C"), ("w", "C")])
    u = sk.users["u"]
    assert sk.items.to_ids(sk.recent_arr[u]) == ["B", "C"]
    assert u not in sk.holders[sk.items.pos["A"]] and u in sk.holders[sk.items.pos["B"]]
    assert list(sk.holders[sk.items.pos["C"]]) == [sk.users["v"], sk.users["w"]]  # u, the oldest, dropped
    sk.update("u", "B", 5.0)  # a repeat moves B to the newest
    assert sk.items.to_ids(sk.recent_arr[u]) == ["C", "B"]


def test_ease_refits_on_schedule_and_ranks_by_popularity_before_the_first_fit():
    events, catalog, groups = grouped_clicks()
    ease, pop = EaseBaseline(refit_every=150, min_clicks=1), PopularityBaseline()
    ease.add_items(catalog)
    pop.add_items(catalog)
    for e in events[:149]:
        ease.update(e["user_id"], e["item_id"], e["timestamp"])
        pop.update(e["user_id"], e["item_id"], e["timestamp"])
    assert ease.trainings == 0 and ease.recommend("u0", 10, {"g0-0"}) == pop.recommend("u0", 10, {"g0-0"})
    ease.update(events[149]["user_id"], events[149]["item_id"], 0.0)
    assert ease.trainings == 1
    for e in events[150:700]:
        ease.update(e["user_id"], e["item_id"], e["timestamp"])
    assert ease.trainings == 4 and ease.clicks == 700
    # a click after the last fit counts at once: a newcomer gets the group of the item clicked
    ease.update("newcomer", groups[3][5], 701.0)
    assert ease.trainings == 4 and sum(i in groups[3] for i in ease.recommend("newcomer", 10, {groups[3][5]})) >= 8


def test_ease_keeps_each_users_scores_up_to_date_between_fits():
    rng = random.Random(5)
    stream = [("heavy", f"i{n}") for n in range(100)]  # more than 64 fitted items: the sparse-row path
    stream += [(f"u{rng.randrange(30)}", f"i{rng.randrange(150)}") for _ in range(1500)]
    stream[1200:1200] = [("heavy", f"i{n}") for n in range(90, 130)]  # 30 new, 10 repeated
    ease = EaseBaseline(refit_every=1000, min_clicks=1)
    feed(ease, stream[:1010])
    for user in ("u1", "u2", "heavy"):
        ease.recommend(user, 5, set())  # computes and keeps their scores
    feed(ease, stream[1010:])
    assert ease.trainings == 1 and len(ease.scores["heavy"]) == len(ease.fit_items)
    for user in ("u1", "u2", "heavy"):
        fitted = ease.fit_pos[ease.items.indices(i for u, i in stream if u == user)]
        x = np.zeros(len(ease.fit_items), dtype=np.float32)
        x[fitted[fitted >= 0]] = 1
        assert np.allclose(ease.scores[user], x @ ease.B, atol=1e-5), user
        kept = ease.recommend(user, 10, set())
        ease.scores.pop(user)
        assert ease.recommend(user, 10, set()) == kept


def test_ease_is_the_closed_form_over_the_most_clicked_items():
    stream = [("u1", "A"), ("u1", "B"), ("u2", "A"), ("u2", "C"), ("u3", "A"), ("u3", "B"), ("u3", "D"),
              ("u4", "C"), ("u4", "E")]
    ease = EaseBaseline(refit_every=len(stream), l2=2.0, min_clicks=2, max_items=3)
    feed(ease, stream, catalog=["E", "D", "C", "B", "A"])
    # clicks: A 3, B 2, C 2, D 1, E 1 -> the fit holds A, B, C (at least 2 clicks), in catalog order
    assert ease.trainings == 1 and ease.items.to_ids(ease.fit_items) == ["C", "B", "A"]
    x = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=float)  # users x (C, B, A)
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(3))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    assert np.allclose(ease.B, b, atol=1e-6)
    # x_u @ B over the fitted items; then the rest (score <= 0 or outside the fit) by popularity
    assert b[2, 0] + b[1, 0] > 0 and ease.recommend("u1", 3, {"A", "B"}) == ["C", "E", "D"]  # D, E: 1 click each
    assert b[0, 2] > 0 > b[0, 1] and ease.recommend("u4", 3, {"C", "E"}) == ["A", "B", "D"]  # E is not fitted
    ease2 = EaseBaseline(refit_every=len(stream), l2=2.0, min_clicks=2, max_items=2)
    feed(ease2, stream, catalog=["E", "D", "C", "B", "A"])
    assert ease2.items.to_ids(ease2.fit_items) == ["C", "A"]  # A, then C before B (ties in catalog order)


def test_cold_items_counts_clicks_on_items_with_fewer_than_5_earlier_clicks():
    s = Scorer(k=10, catalog_size=10)
    for clicks_before in (0, 4, 5, None):
        s.score(["a"], "a", history=3, item_clicks=clicks_before)
    assert s.result()["segments"]["cold_items"]["events_scored"] == 2
    events = [{"type": "click", "user_id": "w", "item_id": "A"}]  # unscored (w's first event), counts for A
    events += [{"type": "query", "user_id": f"u{n}", "text": "hi"} for n in range(7)]  # queries count no click
    events += [{"type": "click", "user_id": f"u{n}", "item_id": "A"} for n in range(7)]  # A had 1 .. 7 clicks
    events += [{"type": "click", "user_id": "u0", "item_id": "B"},  # B had none
               {"type": "click", "user_id": "u1", "item_id": "A"}]  # A had 8
    for n, e in enumerate(events):
        e.update(event_id=f"e{n}", timestamp=float(n))
    recorded = {"always_a": {e["event_id"]: ["A"] for e in events}}
    res = evaluate_stream(events, [PopularityBaseline()], 10, ["A", "B", "C"], recorded=recorded)
    for name in ("popularity", "always_a"):
        assert set(res[name]["segments"]) == set(SEGMENT_NAMES) == {"2-5", "6+", "cold_items"}
        assert res[name]["events_scored"] == 9
        assert res[name]["segments"]["cold_items"]["events_scored"] == 5  # A after 1 .. 4 clicks, and B
        assert res[name]["segments"]["2-5"]["events_scored"] == 2  # the history segments are unchanged
    assert res["always_a"]["segments"]["cold_items"]["hr"] == pytest.approx(4 / 5)  # all but B
    assert res["always_a"]["hr"] == pytest.approx(8 / 9)


def test_every_peer_is_made_and_the_report_shows_the_cold_items_segment():
    from workers.evaluate import SYSTEMS, EvalOptions, _rounded, make_peers, render_report

    peers, skipped = make_peers(EvalOptions(), 100)
    assert [p.name for p in peers] == list(SYSTEMS[1:]) and not skipped
    for name in ("sequential_rules", "session_knn", "ease"):
        assert name in SYSTEMS
    peers, skipped = make_peers(EvalOptions(peers=("item_knn", "sequential_rules", "ease")), 30_000)
    assert [p.name for p in peers] == ["ease"] and set(skipped) == {"item_knn", "sequential_rules"}
    events, catalog, _ = grouped_clicks()
    res = evaluate_stream(events[:300], [PopularityBaseline(), SequentialRulesBaseline()], 10, catalog)
    r = {"dataset": "test", "k": 10, "events": 300, "users": 100, "catalog_items": len(catalog),
         "systems": {name: _rounded(m) for name, m in res.items()},
         "system_seconds": {name: round(v, 1) for name, v in res.seconds.items()},
         "latency_ms": {"p50": 1, "p95": 2, "p99": 3}, "latency_from": "x", "throughput_eps": 1.0, "in_flight": 1,
         "events_answered": 300, "dead_lettered": 0, "dead_letter_reasons": {}, "duplicates": 0,
         "catalog_index_s": 0.1, "stack": {}, "wall_s": 1.0, "machine": {"cpus": 1}, "skipped": {}}
    report = render_report(r, {})
    header = next(line for line in report.splitlines() if "HR@K 2-5" in line)
    assert "HR@K 6+ |" in header and "| HR@K cold items |" in header and "| scored cold items |" in header
    row = next(line for line in report.splitlines() if line.startswith("| sequential_rules |") and line.count("|") > 12)
    cold = res["sequential_rules"]["segments"]["cold_items"]
    assert row.endswith(f"| {cold['hr']:.4f} | {cold['ndcg']:.4f} | {cold['mrr']:.4f} | {cold['coverage']:.4f} | "
                        f"{cold['events_scored']} |") and cold["events_scored"] > 0
