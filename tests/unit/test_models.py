"""Profile updates, ranking, cold start and profile encoding, on small hand-made unit vectors."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from models.params import ModelParams
from models.profile import (Applied, Explainer, Profile, apply_click, apply_query, click_strength, interest_distribution,
                            query_vector)
from models.ranking import Candidate, cold_start, explain, rank
from streams.stores import codec

P = ModelParams()
DIM = 6


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(xs)] = xs
    return (v / np.linalg.norm(v)).astype(np.float32)


def e(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


NUMBERS: dict[str, int] = {}


def no(item_id: str) -> int:
    """A catalog number for ``item_id`` (as the catalog would assign: dense, once)."""
    return NUMBERS.setdefault(item_id, len(NUMBERS))


def click(p: Profile, item_id: str, vec: np.ndarray, *, title: str = "", category: str = "", scene=None,
          strength: float = 1.0, t: float = 1000.0, params: ModelParams = P) -> None:
    apply_click(p, item_id, no(item_id), vec, title or f"Title {item_id}", category, scene, strength, t, params)


def query(p: Profile, text: str, vec: np.ndarray, *, scene=None, t: float = 1000.0, event_id: str = "",
          params: ModelParams = P) -> None:
    apply_query(p, text, vec, scene, event_id or f"q-{text}-{t}", t, params)


def warm_profile() -> Profile:
    """A profile that has seen one item along e0."""
    p = Profile("u1")
    click(p, "a", e(0), category="rock", t=1.0)
    return p


# -- apply_click ----------------------------------------------------------------------------------

def test_first_click_sets_long_and_short_to_the_item():
    p = Profile("u1")
    assert p.is_cold
    click(p, "a", unit(1, 2, 0, 0), category="rock", t=5.0)
    assert not p.is_cold
    np.testing.assert_allclose(p.long, unit(1, 2, 0, 0), atol=1e-6)
    np.testing.assert_allclose(p.short, unit(1, 2, 0, 0), atol=1e-6)
    assert p.long.dtype == np.float32 and p.short.dtype == np.float32


def test_click_moves_long_and_short_toward_the_item_and_short_faster():
    p = warm_profile()
    item = unit(0, 1, 0, 0)
    long_before, short_before = cos(p.long, item), cos(p.short, item)
    click(p, "b", item, t=2.0)
    assert cos(p.long, item) > long_before
    assert cos(p.short, item) > short_before
    assert cos(p.short, item) > cos(p.long, item)  # short-term interest moves faster
    assert np.linalg.norm(p.long) == pytest.approx(1.0, abs=1e-6)
    assert np.linalg.norm(p.short) == pytest.approx(1.0, abs=1e-6)
    # repeated clicks keep converging
    for t in range(3, 10):
        before = cos(p.long, item)
        click(p, f"b{t}", item, t=float(t))
        assert cos(p.long, item) > before


def test_stronger_clicks_move_further():
    weak, strong = warm_profile(), warm_profile()
    item = e(1)
    click(weak, "b", item, strength=0.5)
    click(strong, "b", item, strength=2.0)
    assert cos(strong.short, item) > cos(weak.short, item)
    assert cos(strong.long, item) > cos(weak.long, item)


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_click_update_is_the_documented_ema(strength):
    p = warm_profile()  # long = short = e0
    click(p, "b", e(1), strength=strength)
    for vec, alpha in ((p.long, P.long_alpha), (p.short, P.short_alpha)):
        rate = 1 - (1 - alpha) ** strength  # weight 2 counts as two steps of alpha
        expected = (1 - rate) * e(0) + rate * e(1)
        np.testing.assert_allclose(vec, expected / np.linalg.norm(expected), atol=1e-6)


def test_scene_vectors_only_for_the_clicks_scene():
    p = Profile("u1")
    click(p, "a", e(0), scene=None)
    assert p.scenes == {}
    click(p, "b", e(1), scene="home")
    assert set(p.scenes) == {"home"}
    np.testing.assert_allclose(p.scenes["home"], e(1), atol=1e-6)
    home = p.scenes["home"].copy()
    click(p, "c", e(2), scene="search")
    assert set(p.scenes) == {"home", "search"}
    np.testing.assert_array_equal(p.scenes["home"], home)  # another scene's click leaves it alone
    np.testing.assert_allclose(p.scenes["search"], e(2), atol=1e-6)
    click(p, "d", e(3), scene="home")
    assert cos(p.scenes["home"], e(3)) > 0
    assert cos(p.scenes["search"], e(3)) == pytest.approx(0.0, abs=1e-6)


def test_seen_history_and_counters_grow():
    p = Profile("u1")
    for i in range(4):
        click(p, f"i{i}", e(i % DIM), scene="home", t=10.0 + i)
    assert p.seen == {no("i0"), no("i1"), no("i2"), no("i3")}
    assert p.clicks == 4 and p.queries == 0
    assert [h["item_id"] for h in p.history] == ["i0", "i1", "i2", "i3"]
    assert p.history[-1] == {"type": "click", "item_id": "i3", "scene": "home", "t": 13.0}
    assert p.last_time == 13.0
    click(p, "late", e(0), t=5.0)  # an older event does not move last_time back
    assert p.last_time == 13.0
    click(p, "i0", e(0), t=20.0)  # clicking a seen item again
    assert len(p.seen) == 5 and p.clicks == 6 and len(p.history) == 6


def test_history_is_capped():
    params = replace(P, history_size=5)
    p = Profile("u1")
    for i in range(12):
        click(p, f"i{i}", e(i % DIM), t=float(i), params=params)
        assert len(p.history) == min(i + 1, 5)
    assert [h["item_id"] for h in p.history] == [f"i{i}" for i in range(7, 12)]  # the most recent ones
    assert len(p.seen) == 12  # seen is not capped by history_size


def test_explainers_are_capped_per_kind_and_keep_the_latest():
    params = replace(P, explain_clicks=3, explain_queries=2)
    p = Profile("u1")
    for i in range(5):
        click(p, f"i{i}", e(i % DIM), title=f"Item {i}", t=float(i), params=params)
        query(p, f"search {i}", e((i + 1) % DIM), t=float(i) + 0.5, params=params)
    clicks = [x for x in p.explainers if x.kind == "click"]
    queries = [x for x in p.explainers if x.kind == "query"]
    assert [x.label for x in clicks] == ["Item 2", "Item 3", "Item 4"]
    assert [x.label for x in queries] == ["search 3", "search 4"]
    assert len(p.explainers) == 5
    assert [x.ref for x in clicks] == ["i2", "i3", "i4"]


def test_clicking_an_item_again_refreshes_its_explainer_instead_of_duplicating_it():
    p = Profile("u1")
    click(p, "a", e(0), title="A")
    click(p, "b", e(1), title="B")
    click(p, "a", e(0), title="A")
    assert [x.ref for x in p.explainers] == ["b", "a"]


def test_explainer_label_falls_back_to_the_item_id():
    p = Profile("u1")
    apply_click(p, "sku-1", no("sku-1"), e(0), "", "", None, 1.0, 1.0, P)
    assert p.explainers[0].label == "sku-1"


def test_interest_logits_decay_and_add_strength():
    p = Profile("u1")
    click(p, "a", e(0), category="rock")
    click(p, "b", e(1), category="jazz", strength=2.0)
    assert p.interest["jazz"] == pytest.approx(2.0)
    assert p.interest["rock"] == pytest.approx(1.0 * P.category_decay ** 2)
    click(p, "c", e(2), category="")  # no category: interest unchanged
    assert p.interest == {"rock": pytest.approx(P.category_decay ** 2), "jazz": pytest.approx(2.0)}


# -- click_strength -------------------------------------------------------------------------------

def test_click_strength_scales_with_dwell():
    assert click_strength(1.0, None, P) == 1.0
    assert click_strength(2.5, None, P) == 2.5
    assert click_strength(1.0, P.dwell_full_s, P) == 1.0
    assert click_strength(1.0, P.dwell_full_s * 10, P) == 1.0  # capped at full weight
    assert click_strength(1.0, P.dwell_full_s / 2, P) == pytest.approx(0.5)
    assert click_strength(2.0, P.dwell_full_s / 2, P) == pytest.approx(1.0)
    assert click_strength(1.0, 0.0, P) == pytest.approx(0.1)  # floor: a click still counts a little
    dwells = [0.0, 1.0, 5.0, 10.0, 20.0, 29.0, 30.0, 60.0]
    strengths = [click_strength(1.0, d, P) for d in dwells]
    assert strengths == sorted(strengths)
    assert click_strength(1.0, 10.0, replace(P, click_weight=3.0)) == pytest.approx(1.0)


# -- apply_query ----------------------------------------------------------------------------------

def test_query_moves_short_strongly_and_long_barely():
    after_query, after_click = warm_profile(), warm_profile()
    q = e(1)
    query(after_query, "cool jazz", q)
    click(after_click, "b", q)
    assert cos(after_query.short, q) > cos(after_click.short, q)  # query_short_alpha > short_alpha
    assert cos(after_query.long, q) < cos(after_click.long, q)  # query_long_alpha < long_alpha
    assert cos(after_query.short, q) > cos(after_query.long, q)
    assert cos(after_query.long, q) > 0


def test_query_sets_intent_and_records_it():
    p = warm_profile()
    q = unit(0, 1, 1, 0)
    query(p, "cool jazz", q, scene="search", t=50.0, event_id="q-1")
    np.testing.assert_array_equal(p.intent, q)
    assert p.intent_strength == 1.0
    assert p.queries == 1 and p.clicks == 1
    assert p.history[-1] == {"type": "query", "text": "cool jazz", "scene": "search", "t": 50.0}
    assert p.explainers[-1].kind == "query" and p.explainers[-1].label == "cool jazz" and p.explainers[-1].ref == "q-1"
    assert "search" not in p.scenes  # a query does not create a scene vector
    assert p.seen == {no("a")}  # nor marks anything seen


def test_query_on_a_cold_profile_warms_it():
    p = Profile("u1")
    query(p, "jazz", e(2))
    assert not p.is_cold
    np.testing.assert_allclose(p.short, e(2), atol=1e-6)
    np.testing.assert_allclose(p.long, e(2), atol=1e-6)


def test_query_nudges_an_existing_scene_vector():
    p = Profile("u1")
    click(p, "a", e(0), scene="search")
    before = cos(p.scenes["search"], e(1))
    query(p, "jazz", e(1), scene="search")
    assert cos(p.scenes["search"], e(1)) > before


def test_intent_decays_with_later_clicks():
    p = warm_profile()
    query(p, "jazz", e(1))
    assert p.intent_strength == 1.0
    click(p, "b", e(2))
    assert p.intent_strength == pytest.approx(P.intent_decay)
    click(p, "c", e(2))
    assert p.intent_strength == pytest.approx(P.intent_decay ** 2)
    click(p, "d", e(2), strength=2.0)
    assert p.intent_strength == pytest.approx(P.intent_decay ** 4)
    query(p, "blues", e(3))
    assert p.intent_strength == 1.0  # a new query renews it
    np.testing.assert_array_equal(p.intent, e(3))


# -- interest_distribution ------------------------------------------------------------------------

def softmax(xs: list[float], t: float = 1.0) -> np.ndarray:
    x = np.array(xs, dtype=np.float64) / t
    ex = np.exp(x - x.max())
    return ex / ex.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_interest_distribution_is_the_softmax_of_the_logits(temperature):
    params = replace(P, interest_temperature=temperature)
    p = Profile("u1", interest={"rock": 2.0, "jazz": 0.5, "blues": -0.25})
    n = 10
    dist = interest_distribution(p, n, params)
    assert set(dist) == {"rock", "jazz", "blues", "*"}
    expected = softmax([2.0, 0.5, -0.25] + [0.0] * (n - 3), temperature)
    assert [dist["rock"], dist["jazz"], dist["blues"]] == pytest.approx(list(expected[:3]), rel=1e-9)
    assert dist["*"] == pytest.approx(expected[3], rel=1e-9)
    assert dist["rock"] + dist["jazz"] + dist["blues"] + (n - 3) * dist["*"] == pytest.approx(1.0)


def test_interest_distribution_sums_to_one_after_clicks():
    p = Profile("u1")
    for i, cat in enumerate(["rock", "jazz", "rock", "pop", "rock"]):
        click(p, f"i{i}", e(i % DIM), category=cat)
    n = 7
    dist = interest_distribution(p, n, P)
    touched = sum(v for k, v in dist.items() if k != "*")
    assert touched + (n - len(p.interest)) * dist["*"] == pytest.approx(1.0)
    assert all(0.0 < v < 1.0 for v in dist.values())


def test_cold_interest_is_uniform():
    dist = interest_distribution(Profile("u1"), 8, P)
    assert dist == {"*": pytest.approx(1 / 8)}


def test_interest_with_every_category_touched():
    p = Profile("u1", interest={"rock": 1.0, "jazz": 1.0})
    dist = interest_distribution(p, 2, P)
    assert dist == {"rock": pytest.approx(0.5), "jazz": pytest.approx(0.5), "*": 0.0}


def test_interest_concentrates_on_a_repeatedly_clicked_category():
    p = Profile("u1")
    click(p, "x", e(1), category="pop")
    n = 12
    previous = interest_distribution(p, n, P).get("jazz", 1 / n)
    for i in range(15):
        click(p, f"j{i}", e(0), category="jazz")
        now = interest_distribution(p, n, P)["jazz"]
        assert now > previous
        previous = now
    dist = interest_distribution(p, n, P)
    assert dist["jazz"] > 0.5
    assert dist["jazz"] > 10 * max(dist["pop"], dist["*"])


def test_large_logits_do_not_overflow():
    p = Profile("u1", interest={"rock": 5000.0, "jazz": 4999.0})
    dist = interest_distribution(p, 5, P)
    assert all(math.isfinite(v) for v in dist.values())
    assert dist["rock"] + dist["jazz"] + 3 * dist["*"] == pytest.approx(1.0)


# -- query_vector ---------------------------------------------------------------------------------

def test_query_vector_is_none_for_a_cold_profile():
    assert query_vector(Profile("u1"), None, P) is None
    assert query_vector(Profile("u1"), "home", P) is None


def test_query_vector_is_unit_length():
    p = Profile("u1")
    click(p, "a", unit(1, 1, 0, 0), scene="home")
    click(p, "b", unit(0, 1, 1, 0))
    query(p, "jazz", unit(0, 0, 1, 1))
    for scene in (None, "home", "elsewhere"):
        v = query_vector(p, scene, P)
        assert v is not None and v.dtype == np.float32
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)


def test_query_vector_favours_the_scenes_vector():
    p = Profile("u1")
    click(p, "a", e(0), scene="home")
    for i in range(6):
        click(p, f"b{i}", e(1), scene="search")
    assert cos(p.short, e(1)) > 0.9  # the shared vectors lean to what was clicked in "search"
    home, anywhere = query_vector(p, "home", P), query_vector(p, None, P)
    assert cos(home, e(0)) > cos(anywhere, e(0))
    assert cos(query_vector(p, "search", P), e(1)) > cos(anywhere, e(1))
    np.testing.assert_array_equal(query_vector(p, "unknown-scene", P), anywhere)


def test_query_vector_follows_a_fresh_intent_and_forgets_a_stale_one():
    p = Profile("u1")
    click(p, "a", e(0))
    before = query_vector(p, None, P)
    query(p, "jazz", e(3))
    fresh = query_vector(p, None, P)
    assert cos(fresh, e(3)) > cos(before, e(3))
    p.intent_strength = 0.0  # intent fully decayed: only long and short remain
    stale = query_vector(p, None, P)
    mix = P.w_long * p.long + P.w_short * p.short
    np.testing.assert_allclose(stale, mix / np.linalg.norm(mix), atol=1e-6)


# -- rank -----------------------------------------------------------------------------------------

def cand(item_id: str, sim: float, category: str = "", vec=None, title: str = "", scenes=()) -> Candidate:
    return Candidate(item_id, sim, vec, title or f"Title {item_id}", category, tuple(scenes), no=no(item_id))


def test_rank_never_returns_seen_or_excluded_items():
    p = Profile("u1")
    click(p, "seen-1", e(0))
    click(p, "seen-2", e(1))
    cands = [cand("seen-1", 0.99), cand("x-1", 0.95), cand("ok-1", 0.9), cand("seen-2", 0.85), cand("x-2", 0.8),
             cand("ok-2", 0.7)]
    out = rank(p, cands, 10, None, 4, P, exclude={"x-1", "x-2"})
    assert [r.item_id for r in out] == ["ok-1", "ok-2"]


def test_rank_respects_k_and_drops_duplicate_candidates():
    p = warm_profile()
    cands = [cand(f"i{i}", 0.9 - i / 100) for i in range(10)] + [cand("i0", 0.9)]
    assert [r.item_id for r in rank(p, cands, 3, None, 4, P)] == ["i0", "i1", "i2"]
    assert len(rank(p, cands, 50, None, 4, P)) == 10
    assert rank(p, cands, 0, None, 4, P) == []
    assert rank(p, [], 5, None, 4, P) == []


def test_rank_respects_only_categories():
    p = warm_profile()
    cands = [cand("r1", 0.9, "rock"), cand("j1", 0.8, "jazz"), cand("p1", 0.7, "pop"), cand("n1", 0.95, ""),
             cand("j2", 0.6, "jazz")]
    out = rank(p, cands, 10, None, 4, P, only_categories=["jazz", "pop"])
    assert [r.item_id for r in out] == ["j1", "p1", "j2"]
    assert {r.category for r in out} <= {"jazz", "pop"}


def test_rank_orders_by_score():
    p = Profile("u1", interest={"rock": 3.0, "jazz": 1.0})
    p.seen.add(no("zzz"))
    rng = np.random.default_rng(7)
    cats = ["rock", "jazz", "pop", ""]
    cands = [cand(f"i{i:02d}", float(rng.uniform(-0.2, 0.95)), cats[i % 4]) for i in range(30)]
    out = rank(p, cands, 12, None, 5, P)
    assert len(out) == 12
    scores = [r.score for r in out]
    assert scores == sorted(scores, reverse=True)
    # without diversity the order is plain score order
    plain = rank(p, cands, 30, None, 5, replace(P, diversity=0.0))
    assert [r.score for r in plain] == sorted((r.score for r in plain), reverse=True)
    assert len(plain) == 30


def test_rank_score_adds_interest_and_scene_boosts():
    p = Profile("u1", interest={"rock": 2.0})
    n = 4
    dist = interest_distribution(p, n, P)
    params = replace(P, diversity=0.0)
    out = {r.item_id: r for r in rank(p, [cand("r", 0.5, "rock"), cand("j", 0.5, "jazz"), cand("n", 0.5, ""),
                                          cand("s", 0.5, "", scenes=["home"])], 10, "home", n, params)}
    assert out["r"].score == pytest.approx(0.5 + P.w_interest * (dist["rock"] - 1 / n), abs=1e-6)
    assert out["j"].score == pytest.approx(0.5 + P.w_interest * (dist["*"] - 1 / n), abs=1e-6)
    assert out["n"].score == pytest.approx(0.5, abs=1e-6)
    assert out["s"].score == pytest.approx(0.5 + P.w_scene_item, abs=1e-6)
    assert out["r"].score > out["s"].score > out["n"].score > out["j"].score


def test_rank_diversity_lets_a_new_category_overtake_a_third_of_the_same():
    p = Profile("u1")  # no interest: the category boost is 0 for every item
    cands = [cand("rock-1", 0.90, "rock"), cand("rock-2", 0.89, "rock"), cand("rock-3", 0.88, "rock"),
             cand("jazz-1", 0.865, "jazz")]
    assert [r.item_id for r in rank(p, cands, 4, None, 2, replace(P, diversity=0.0))] == \
        ["rock-1", "rock-2", "rock-3", "jazz-1"]
    out = rank(p, cands, 4, None, 2, P)  # diversity 0.02 per item of the same category already chosen
    assert [r.item_id for r in out] == ["rock-1", "rock-2", "jazz-1", "rock-3"]
    # rock-2 is also penalised (0.89 - 0.02 = 0.87) but still beats jazz-1 (0.865)
    assert [r.score for r in out] == pytest.approx([0.90, 0.87, 0.865, 0.88 - 2 * P.diversity])


def test_a_batch_ranks_each_list_exactly_as_alone():
    """rank_many computes every list's features and scores at once: each list (items, scores,
    reasons, and the impression it remembers) is what ranking it alone gives, whatever shares
    the batch; rank features are taken within each list, ties included."""
    from models.ranking import Job, Signals, rank_many

    rng = np.random.default_rng(11)
    cats = ["rock", "jazz", "pop", ""]
    jobs = []
    for u in range(12):
        p = Profile(f"u{u}", interest={"rock": float(u % 3), "jazz": 1.0})
        click(p, f"seen-{u}", e(u % DIM), title=f"Seen {u}", category=cats[u % 4])
        if u % 2:
            query(p, f"search {u}", e((u + 1) % DIM))
        n = int(rng.integers(0, 25))
        ids = [f"c{int(x):02d}" for x in rng.integers(0, 40, size=n)]  # repeats: dropped as duplicates
        sims = rng.choice([0.3, 0.5, 0.5, 0.7, 0.9], size=n)  # ties in the text rank
        cands = [cand(y, float(v), cats[int(y[1:]) % 4], unit(*rng.uniform(0.1, 1, size=DIM)),
                      scenes=("home",) if int(y[1:]) % 3 == 0 else ()) for y, v in zip(ids, sims)]
        counts = {y: float(rng.choice([0.0, 1.0, 1.0, 3.0])) for y in ids}  # ties and zeros
        sig = Signals(cooccur=counts, cooccur_from={y: "Seen" for y in counts},
                      transitions={y: v / 2 for y, v in counts.items()}, transitions_from={y: "Seen" for y in counts},
                      popularity={y: float(rng.choice([0.0, 0.25, 1.0])) for y in ids},
                      item_clicks={y: float(rng.integers(0, 4)) for y in ids})
        jobs.append(Job(p, cands, int(rng.integers(0, 12)), "home" if u % 2 else None,
                        frozenset(ids[:1]) if u % 4 == 0 else frozenset(), ("rock", "jazz") if u % 5 == 0 else (), sig))
    weights = rng.normal(size=11)
    together = rank_many(jobs, 4, P, weights)
    for job, got in zip(jobs, together):
        alone = rank_many([job], 4, P, weights)[0]
        assert [(r.item_id, r.score, r.reason) for r in got] == [(r.item_id, r.score, r.reason) for r in alone]
        assert got.impression.numbers == alone.impression.numbers
        assert np.array_equal(got.impression.features, alone.impression.features)
    assert sum(len(r) for r in together) > 40


def test_segment_ranks_are_each_segments_own_rank_feature():
    from models.learning import rank_feature
    from models.ranking import segment_ranks

    rng = np.random.default_rng(3)
    sizes = [0, 1, 7, 30, 4, 0, 12]
    values = [rng.choice([-1.0, 0.0, 0.5, 0.5, 2.0, 3.0], size=n) for n in sizes]
    seg = np.repeat(np.arange(len(sizes)), sizes)
    got = segment_ranks(np.concatenate(values), seg)
    assert got.tolist() == np.concatenate([rank_feature(v) for v in values]).tolist()


def test_profile_vectors_rounded_together_as_one_by_one():
    rng = np.random.default_rng(5)
    vectors = [rng.normal(size=16).astype(np.float32) for _ in range(6)] + [np.zeros(16, dtype=np.float32),
                                                                          rng.normal(size=16)]  # zero, float64
    together = list(codec._round_rows(vectors))
    assert all(np.array_equal(a, codec._round(v)) and a.dtype == np.float32 for a, v in zip(together, vectors))


def test_rank_gives_every_item_a_non_empty_reason():
    p = Profile("u1")
    click(p, "a", e(0), title="Blue Train", category="jazz")
    query(p, "delta blues", e(1))
    vecs = [e(0), e(1), e(2), None, unit(1, 1, 0, 0), unit(0, 0, 1, 1)]
    cands = [cand(f"i{i}", 0.9 - i / 100, ["jazz", "blues", ""][i % 3], v) for i, v in enumerate(vecs)]
    out = rank(p, cands, 10, None, 3, P)
    assert len(out) == len(vecs)
    assert all(isinstance(r.reason, str) and r.reason.strip() for r in out)
    assert all(r.title == f"Title {r.item_id}" for r in out)


def test_reasons_name_the_closest_click_or_search():
    p = Profile("u1")
    click(p, "bt", e(0), title="Blue Train", category="jazz")
    query(p, "delta blues", e(1))
    cands = [cand("near-click", 0.9, "jazz", unit(1, 0.2, 0, 0)),
             cand("near-query", 0.8, "blues", unit(0.1, 1, 0, 0)),
             cand("interest", 0.7, "jazz", e(3)),
             cand("nothing", 0.6, "pop", e(4)),
             cand("no-vector", 0.5, "", None)]
    reasons = {r.item_id: r.reason for r in rank(p, cands, 10, None, 4, P)}
    assert reasons["near-click"] == "similar to Blue Train you clicked"
    assert reasons["near-query"] == "matches your search 'delta blues'"
    dist = interest_distribution(p, 4, P)
    assert reasons["interest"] == f"matches your interest in jazz ({dist['jazz']:.0%})"
    assert reasons["nothing"] == "close to your recent activity"
    assert reasons["no-vector"] == "close to your recent activity"


def test_reason_needs_the_minimum_similarity():
    p = Profile("u1")
    click(p, "bt", e(0), title="Blue Train")
    m = P.reason_min_similarity
    close = cand("c", 0.5, "", unit(m + 0.01, math.sqrt(1 - (m + 0.01) ** 2)))
    far = cand("f", 0.5, "", unit(m - 0.01, math.sqrt(1 - (m - 0.01) ** 2)))
    assert explain(p, close, {"*": 1.0}, P) == "similar to Blue Train you clicked"
    assert explain(p, far, {"*": 1.0}, P) == "close to your recent activity"


def test_reason_clips_long_labels():
    p = Profile("u1")
    long_text = "a very long search " * 10
    query(p, long_text, e(1))
    reason = explain(p, cand("x", 0.5, "", e(1)), {"*": 1.0}, P)
    assert reason.startswith("matches your search 'a very long search")
    assert reason.endswith("…'")
    assert len(reason) == len("matches your search ''") + 60


# -- cold_start -----------------------------------------------------------------------------------

def test_cold_start_popular_first_then_newest():
    popular = [cand("p1", 9.0), cand("p2", 5.0), cand("p3", 1.0)]
    newest = [cand("n1", 1767225600.0), cand("n2", 1767225000.0)]
    out = cold_start(popular, newest, 10)
    assert [r.item_id for r in out] == ["p1", "p2", "p3", "n1", "n2"]
    assert [r.reason for r in out] == ["popular now"] * 3 + ["new in the catalog"] * 2
    assert out[0].score == 9.0
    assert [r.item_id for r in cold_start(popular, newest, 4)] == ["p1", "p2", "p3", "n1"]
    assert [r.item_id for r in cold_start(popular, newest, 2)] == ["p1", "p2"]
    assert cold_start(popular, newest, 0) == []


def test_cold_start_skips_excluded_and_duplicates():
    popular = [cand("a", 3.0, "rock"), cand("b", 2.0, "jazz"), cand("a", 1.0, "rock")]
    newest = [cand("b", 10.0, "jazz"), cand("c", 9.0, "pop"), cand("d", 8.0, "jazz")]
    out = cold_start(popular, newest, 10, exclude={"c"})
    assert [r.item_id for r in out] == ["a", "b", "d"]
    assert [r.reason for r in out] == ["popular now", "popular now", "new in the catalog"]
    assert len({r.item_id for r in out}) == len(out)
    only_jazz = cold_start(popular, newest, 10, only_categories=["jazz"])
    assert [r.item_id for r in only_jazz] == ["b", "d"]


def test_cold_start_with_nothing_popular_yet():
    out = cold_start([], [cand("n1", 2.0), cand("n2", 1.0)], 5)
    assert [(r.item_id, r.reason) for r in out] == [("n1", "new in the catalog"), ("n2", "new in the catalog")]
    assert cold_start([], [], 5) == []


# -- the profile record (streams.stores.codec) ------------------------------------------------------

def full_profile() -> Profile:
    rng = np.random.default_rng(3)
    p = Profile("u-1042", encoder="wordhash:8")
    for i in range(4):
        v = rng.normal(size=DIM).astype(np.float32)
        click(p, f"sku-{i}", v / np.linalg.norm(v), title=f"Album «{i}»", category=["jazz", "rock"][i % 2],
              scene=["home", "search"][i % 2], strength=1.0 + i / 4, t=1767225600.0 + i)
        p.applied.record(Applied.source("events", 2), 100 + i, f"ev-{i}", P.recent_events)
    query(p, "cool jazz — piano trio", unit(1, 0, 1, 0), scene="search", t=1767225700.5, event_id="q-7")
    click(p, "sku-9", unit(0, 1, 0, 1), title="Blue Train", category="jazz", t=1767225800.0)
    return p


def resolve(q: Profile, p: Profile) -> None:
    """Give ``q``'s click explainers their item vectors, as the pipeline does from the item index."""
    vectors = {x.ref: x.vector for x in p.explainers if x.kind == "click"}
    for x in q.explainers:
        if x.kind == "click":
            x.vector = vectors[x.ref]


def test_profile_round_trips_through_its_record():
    p = full_profile()
    assert p.long is not None and p.short is not None and p.intent is not None and 0 < p.intent_strength < 1
    assert set(p.scenes) == {"home", "search"} and p.interest and p.history and p.seen
    assert {x.kind for x in p.explainers} == {"click", "query"}
    q, forgotten = codec.decode("u-1042", codec.encode(p, 7))
    assert not forgotten and q.user_id == "u-1042" and q.version == 7 and q.encoder == "wordhash:8"
    for name in ("long", "short", "intent"):
        assert cos(getattr(q, name), getattr(p, name)) > 0.9999  # int8 with a scale per vector
        assert getattr(q, name).dtype == np.float32
    assert list(q.scenes) == list(p.scenes)  # in order of use
    for scene in p.scenes:
        assert cos(q.scenes[scene], p.scenes[scene]) > 0.9999
    assert q.intent_strength == pytest.approx(p.intent_strength, rel=1e-6)
    assert q.interest == pytest.approx(p.interest, rel=1e-6)
    assert q.history == p.history
    assert q.seen == p.seen
    assert (q.clicks, q.queries, q.last_time) == (p.clicks, p.queries, p.last_time)
    assert (q.applied.offsets, q.applied.recent, q.applied.count, q.applied.digest) == (
        p.applied.offsets, p.applied.recent, p.applied.count, p.applied.digest)
    assert [(x.kind, x.label, x.ref) for x in q.explainers] == [(x.kind, x.label, x.ref) for x in p.explainers]
    assert all(x.vector is None for x in q.explainers if x.kind == "click")  # the item index has them
    # decoded arrays are writable copies, not views of the stored bytes
    q.long[0] = 0.5
    q.scenes["home"][0] = 0.5
    # and the decoded profile ranks like the original
    cands = [cand(f"c{i}", 0.9 - i / 50, ["jazz", "rock", ""][i % 3], unit(*np.eye(DIM)[i % DIM])) for i in range(8)]
    q2, _ = codec.decode("u-1042", codec.encode(p, 7))
    resolve(q2, p)
    assert ([(r.item_id, r.reason) for r in rank(p, cands, 5, "home", 3, P)]
            == [(r.item_id, r.reason) for r in rank(q2, cands, 5, "home", 3, P)])


def test_cold_profile_round_trips():
    q, _ = codec.decode("u-new", codec.encode(Profile("u-new"), 1))
    assert q.is_cold and q.intent is None and q.scenes == {} and q.explainers == [] and q.history == []
    assert q.version == 1 and q.seen == set()


def test_a_forgotten_profile_keeps_only_what_recognises_its_events():
    p = full_profile()
    q, forgotten = codec.decode("u-1042", codec.encode(p, 3, forgotten=True))
    assert forgotten and q.is_cold and not q.seen and not q.history and not q.interest and not q.explainers
    assert q.applied.offsets == p.applied.offsets and q.applied.recent == p.applied.recent
    assert len(codec.encode(p, 3, forgotten=True)) < 200


@pytest.mark.parametrize("raw, why", [(b"", "not a streamrec"), (b"{json: 1}", "not a streamrec"),
                                      (b"SR\x01" + bytes(8), "schema 1"), (None, "ends early")])
def test_unreadable_records_say_why(raw, why):
    if raw is None:
        raw = codec.encode(full_profile(), 2)[:-3]
    with pytest.raises(codec.CorruptProfile, match=why):
        codec.decode("u", raw)


@pytest.mark.parametrize("seen", [set(), {0}, {7, 8, 9}, set(range(0, 5000, 2)), {2 ** 31 - 1},
                                  set(np.random.default_rng(1).choice(10 ** 7, 3000, replace=False).tolist())])
def test_seen_sets_round_trip_exactly(seen):
    raw = codec.encode_seen(seen)
    assert codec.decode_seen(codec._R(raw)) == seen
    if seen:  # never more than a bitmap over the catalog, about a byte per item when dense
        assert len(raw) <= max(seen) // 8 + 6


def test_record_stays_small_with_history():
    """At 1,000 clicks on a 10,000-item catalog the record is about 4 KB, and past the history
    window it grows by the seen set alone (bounded by the catalog)."""
    rng = np.random.default_rng(0)
    p = Profile("u")
    sizes = {}
    for i in range(1, 2001):
        v = rng.normal(size=384).astype(np.float32)
        n = int(rng.integers(0, 10_000))
        apply_click(p, f"item-{n:05d}", n, v / np.linalg.norm(v), f"Title {n}", f"c{n % 20}", "home", 1.0, 1e9 + i, P)
        p.applied.record(Applied.source("events", 0), i, f"e{i}", P.recent_events)
        if i in (100, 1000, 2000):
            sizes[i] = len(codec.encode(p, i))
    assert sizes[100] < 3000 and sizes[1000] < 4500
    assert sizes[2000] - sizes[1000] < 1250 + 100  # the bitmap of 10,000 items caps the seen set


def test_applied_recognises_offsets_and_recent_ids_and_sums_every_event():
    a = Applied()
    src = Applied.source("events", 0)
    for i in range(40):
        a.record(src, i, f"e{i}", 16)
    assert a.seen_before(src, 39, "new") and a.seen_before(src, 0, "new")  # any redelivered offset
    assert not a.seen_before(src, 40, "new")
    assert a.seen_before(Applied.source("replayed", 0), 0, "e39")  # a recent id at another offset
    assert not a.seen_before(Applied.source("replayed", 0), 0, "e3")  # older ids are not kept
    assert (a.count, a.digest) == Applied.expected([f"e{i}" for i in range(40)])
    assert len(a.recent) == 16


def test_explainer_dataclass_fields():
    x = Explainer("click", "Blue Train", "sku-9", e(0))
    assert (x.kind, x.label, x.ref) == ("click", "Blue Train", "sku-9")


def test_a_record_cuts_a_long_string_between_characters_and_keeps_short_ones_whole():
    from streams.stores.codec import _R, _W

    w = _W()
    for s in ("\u00e9" * 40000, "a" + "\u00e9" * 40000, "caf\u00e9 \U0001f3ac", "", None):
        w.str(s)
    r = _R(b"".join(w.parts))
    cut = r.str()
    assert cut == "\u00e9" * 32767 and len(cut.encode()) == 65534  # not 65535: that byte splits an "é"
    assert r.str() == "a" + "\u00e9" * 32767
    assert r.str() == "caf\u00e9 \U0001f3ac" and r.str() == "" and r.str() == ""
