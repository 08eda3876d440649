"""Unit tests for workers.demo_data (pure Python, no services)."""

from collections import Counter

import pytest

from workers.demo_data import (
    CATEGORIES,
    SimUser,
    build_catalog,
    chance_rate,
    query_texts,
    simulate_events,
)

ITEM_KEYS = {"type", "item_id", "title", "description", "category", "tags", "scenes", "available", "timestamp"}


def test_categories_are_eight_distinct():
    assert len(CATEGORIES) == 8
    assert len(set(CATEGORIES)) == 8


def test_catalog_is_deterministic_and_seed_dependent():
    assert build_catalog(seed=3) == build_catalog(seed=3)
    assert build_catalog(seed=3) != build_catalog(seed=4)


def test_catalog_shape_and_fields():
    catalog = build_catalog(n_items=400, start_ts=1000.0)
    assert len(catalog) == 400
    for index, item in enumerate(catalog):
        assert set(item) == ITEM_KEYS
        assert item["type"] == "item"
        assert item["available"] is True
        assert item["timestamp"] == 1000.0 + index
        assert item["item_id"].startswith(f"demo-{item['category']}-")
        assert item["title"] and item["description"].endswith(".")
        assert 2 <= len(item["tags"]) <= 4
        assert len(set(item["tags"])) == len(item["tags"])
        assert all(t == t.lower() and t.isalpha() for t in item["tags"])
        assert item["scenes"] and set(item["scenes"]) <= {"home", "mobile", "tv"}
        assert len(set(item["scenes"])) == len(item["scenes"])


@pytest.mark.parametrize("n_items", [400, 96 * 8, 1000])
def test_unique_ids_titles_and_descriptions(n_items):
    catalog = build_catalog(n_items=n_items)
    assert len({i["item_id"] for i in catalog}) == n_items
    assert len({i["title"] for i in catalog}) == n_items
    assert len({i["description"] for i in catalog}) == n_items


@pytest.mark.parametrize("n_items", [400, 83, 8, 5])
def test_even_category_split(n_items):
    counts = Counter(i["category"] for i in build_catalog(n_items=n_items))
    assert set(counts) <= set(CATEGORIES)
    if n_items >= len(CATEGORIES):
        assert set(counts) == set(CATEGORIES)
    assert max(counts.values()) - min(counts.values()) <= 1
    if n_items == 400:
        assert set(counts.values()) == {50}


def test_tags_do_not_cross_categories():
    by_cat: dict[str, set[str]] = {}
    for item in build_catalog(n_items=800):
        by_cat.setdefault(item["category"], set()).update(item["tags"])
    seen: dict[str, str] = {}
    for cat, tags in by_cat.items():
        for tag in tags:
            assert seen.setdefault(tag, cat) == cat, f"tag {tag!r} in {cat} and {seen[tag]}"


def test_query_texts_non_empty_for_all_categories():
    for category in CATEGORIES:
        texts = query_texts(category)
        assert len(texts) >= 6
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert len(set(texts)) == len(texts)
    with pytest.raises(ValueError):
        query_texts("knitting")


def test_simulation_is_deterministic():
    catalog = build_catalog()
    assert simulate_events(catalog, seed=5) == simulate_events(catalog, seed=5)
    assert simulate_events(catalog, seed=5) != simulate_events(catalog, seed=6)


def test_simulated_users_and_event_counts():
    catalog = build_catalog()
    events, users = simulate_events(catalog, n_users=30, events_per_user=9)
    assert len(users) == 30 and len(events) == 30 * 9
    assert [u.user_id for u in users] == [f"demo-user-{i:03d}" for i in range(30)]
    for user in users:
        assert isinstance(user, SimUser)
        assert 1 <= len(user.categories) <= 2
        assert len(set(user.categories)) == len(user.categories)
        assert set(user.categories) <= set(CATEGORIES)
    per_user = Counter(e["user_id"] for e in events)
    assert set(per_user.values()) == {9}


def test_event_fields_and_references():
    catalog = build_catalog()
    item_ids = {i["item_id"] for i in catalog}
    events, users = simulate_events(catalog, scenes=("home", "tv"))
    latent = {u.user_id: u.categories for u in users}
    all_queries = {c: set(query_texts(c)) for c in CATEGORIES}
    assert [e["event_id"] for e in events] == [f"demo-e-{i:06d}" for i in range(len(events))]
    for e in events:
        assert "timestamp" not in e
        assert e["scene"] in ("home", "tv")
        if e["type"] == "click":
            assert set(e) == {"type", "event_id", "user_id", "item_id", "scene", "weight"}
            assert e["item_id"] in item_ids
            assert e["weight"] == 1.0
        else:
            assert e["type"] == "query"
            assert set(e) == {"type", "event_id", "user_id", "text", "scene"}
            assert any(e["text"] in all_queries[c] for c in latent[e["user_id"]])


def test_first_event_is_click_and_per_user_order_preserved():
    catalog = build_catalog()
    events, users = simulate_events(catalog, query_share=0.9)
    by_user: dict[str, list[dict]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    assert set(by_user) == {u.user_id for u in users}
    for stream in by_user.values():
        assert stream[0]["type"] == "click"
        ids = [e["event_id"] for e in stream]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert Counter(e["type"] for e in events)["query"] > 0


def test_events_are_interleaved():
    events, _ = simulate_events(build_catalog(), n_users=20, events_per_user=5)
    first_round = [e["user_id"] for e in events[:20]]
    assert len(set(first_round)) == 20
    assert first_round != sorted(first_round)


def test_clicks_mostly_follow_latent_categories():
    catalog = build_catalog()
    category_of = {i["item_id"]: i["category"] for i in catalog}
    events, users = simulate_events(catalog, n_users=100, events_per_user=20)
    latent = {u.user_id: u.categories for u in users}
    clicks = [e for e in events if e["type"] == "click"]
    hits = sum(category_of[e["item_id"]] in latent[e["user_id"]] for e in clicks)
    assert 0.85 <= hits / len(clicks) < 1.0


def test_query_share_zero_gives_only_clicks():
    events, _ = simulate_events(build_catalog(), query_share=0.0)
    assert {e["type"] for e in events} == {"click"}


def test_chance_rate_one_category_users_on_even_catalog():
    catalog = build_catalog(n_items=400)
    users = [SimUser(f"u{i}", (c,)) for i, c in enumerate(CATEGORIES)]
    assert chance_rate(catalog, users) == pytest.approx(0.125)
    assert chance_rate(catalog, [SimUser("u", ("jazz", "travel"))]) == pytest.approx(0.25)


def test_chance_rate_of_simulated_users_is_between_bounds():
    catalog = build_catalog()
    _, users = simulate_events(catalog)
    assert 0.125 <= chance_rate(catalog, users) <= 0.25
