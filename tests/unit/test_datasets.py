"""Data set loaders: a small MovieLens-format folder written by the test, the generic JSONL format,
and (when ../shared is beside the checkout) the real MovieLens latest-small."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from schemas import Limits, parse_catalog, parse_event
from workers.datasets import load_dataset

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "movielens-latest-small"


@pytest.fixture
def movielens(tmp_path):
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,"Heat, The (1995)",Action|Crime\n'
        "3,Odd One (2000),(no genres listed)\n")
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,2.0,100\n2,2,5.0,50\n1,3,3.5,300\n")
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,1,pixar,100\n2,2, ,60\n2,1,funny,40\n")
    return tmp_path


def test_movielens_catalog_uses_title_and_genres_only(movielens):
    ds = load_dataset(movielens)
    assert [i["item_id"] for i in ds.catalog] == ["1", "2", "3"]
    toy = ds.catalog[0]
    assert toy["title"] == "Toy Story (1995)" and toy["category"] == "Adventure"
    assert toy["description"] == "Adventure, Animation" and toy["tags"] == ["adventure", "animation"]
    assert ds.catalog[1]["title"] == "Heat, The (1995)"
    assert ds.catalog[2]["category"] == "" and ds.catalog[2]["tags"] == []
    assert all(i["timestamp"] <= min(e["timestamp"] for e in ds.events) for i in ds.catalog)


def test_movielens_events_in_time_order_with_file_order_ties(movielens):
    ds = load_dataset(movielens)
    assert [(e["event_id"], e["timestamp"]) for e in ds.events] == [
        ("t3", 40.0), ("r3", 50.0), ("r1", 100.0), ("r2", 100.0), ("t1", 100.0), ("r4", 300.0)]
    assert ds.events[0] == {"type": "query", "event_id": "t3", "user_id": "2", "text": "funny", "timestamp": 40.0}
    assert ds.events[1]["type"] == "click" and ds.events[1]["item_id"] == "2"


def test_movielens_threshold_and_limit(movielens):
    ds = load_dataset(movielens, "movielens", min_rating=4.0, limit_events=3)
    assert [e["event_id"] for e in ds.events] == ["t3", "r3", "r1"]
    assert "r2" not in [e["event_id"] for e in load_dataset(movielens, min_rating=4.0).events]


def test_every_loaded_record_is_valid_input(movielens):
    ds = load_dataset(movielens)
    limits, now = Limits(), time.time()
    for item in ds.catalog:
        parse_catalog(json.dumps(item).encode(), limits, now)
    for e in ds.events:
        parse_event(json.dumps(e).encode(), limits, now)


def test_jsonl_format_keeps_file_order_and_reports_bad_lines(tmp_path):
    (tmp_path / "catalog.jsonl").write_text(json.dumps({"type": "item", "item_id": "a", "title": "A",
                                                        "timestamp": 1.0}) + "\n\n")
    events = [{"type": "click", "event_id": f"e{n}", "user_id": "u", "item_id": "a", "timestamp": 10.0 - n}
              for n in range(3)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    ds = load_dataset(tmp_path)
    assert ds.events == events and len(ds.catalog) == 1
    (tmp_path / "events.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="events.jsonl:1: not JSON"):
        load_dataset(tmp_path, "jsonl")


@pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent (the shared data sets are not beside the checkout)")
def test_real_movielens_latest_small():
    ds = load_dataset(SHARED)
    assert len(ds.catalog) == 9742
    clicks = [e for e in ds.events if e["type"] == "click"]
    queries = [e for e in ds.events if e["type"] == "query"]
    assert len(clicks) == 100_836 and len(queries) == 3683
    assert all(a["timestamp"] <= b["timestamp"] for a, b in zip(ds.events, ds.events[1:]))
    assert len({e["user_id"] for e in ds.events}) == 610
