"""The live page's data: latest lists per user and scene, list latency, the user panel."""

from __future__ import annotations

import json

from models.profile import Profile
from streams.ui import PAGE, LiveView, user_view


def rec(user, scene, trigger_id, items, event_time=100.0, produced=100.25, trigger="click"):
    return (user.encode(), json.dumps({"user_id": user, "scene": scene, "trigger_type": trigger,
                                       "trigger_event_id": trigger_id, "event_time": event_time,
                                       "produced_time": produced, "items": items}).encode())


def test_the_view_keeps_each_users_latest_list_per_scene_and_the_latency():
    view = LiveView(users=2, clock=lambda: 101.0)
    item = {"item_id": "i1", "title": "T1", "category": "jazz", "score": 0.5, "reason": "popular now"}
    view.observe([rec("a", "home", "e1", [item]), rec("a", "tv", "e2", [item], produced=100.5),
                  rec("b", None, "e3", [item]), rec("a", "home", "e4", [item], produced=100.75)])
    assert view.lists["a"]["home"]["trigger_event_id"] == "e4" and set(view.lists["a"]) == {"home", "tv"}
    assert view.pick() == "a" and view.pick("zz") == "zz"  # the user with lists in the most scenes
    assert view.latency_ms() == 500.0  # the median of 250, 500, 250 and 750 ms
    view.observe([rec("c", "", "e5", [item])])  # a third user: the oldest one goes
    assert list(view.lists) == ["a", "c"]
    view.observe([rec("d", "", "r1", [item], event_time=1.0, trigger="request")])  # requests: no latency
    assert len(view.latencies) == 5


def test_the_user_panel_has_the_interest_distribution_history_and_lists_by_scene():
    p = Profile(user_id="a", interest={"jazz": 0.7, "cooking": 0.3}, clicks=1, queries=1,
                history=[{"type": "click", "item_id": "i1", "scene": "home", "t": 1.0},
                         {"type": "query", "text": "late piano", "scene": "home", "t": 2.0}])
    item = {"item_id": "i2", "title": "T2", "category": "jazz", "score": 0.5, "reason": "matches your search"}
    lists = {"home": json.loads(rec("a", "home", "e2", [item])[1]), "tv": json.loads(rec("a", "tv", "e1", [item])[1])}
    v = user_view("a", p, lists, {"i1": "Blue Note"}, {"jazz": 0.5, "cooking": 0.3, "*": 0.1})
    assert v["interest"] == [("jazz", 0.5), ("cooking", 0.3), ("each other category", 0.1)]
    assert [h["what"] for h in v["history"]] == ["late piano", "Blue Note"]  # newest first, titles for clicks
    assert list(v["scenes"]) == ["home", "tv"] and v["scenes"]["home"]["items"][0]["reason"] == "matches your search"
    json.dumps(v)  # what /api/live sends


def test_the_page_needs_nothing_from_the_network():
    assert "api/live" in PAGE and "http://" not in PAGE and "https://" not in PAGE
