"""The main path end to end on real services: Kafka broker, redis-server, Milvus Lite, the real
encoder, a real worker process. The tests that lean on the item index (searches by profile and by
query, seen-item filters, deletes, fresh upserts, scene filters) run on Milvus standalone too (a
token, HNSW), as ``[milvus-standalone]``."""

from __future__ import annotations

import base64
import time
import json

import pytest

from streams.stores import codec
from tests.integration.conftest import BY_ID, items_of
from workers.runner import read_outputs, wait_stat

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


def wait_stat_all(harness, targets: dict[str, int]) -> dict[str, int]:
    for name, value in targets.items():
        wait_stat(harness.redis, harness.prefix, name, value, 60, harness.worker)
    return harness.stats()


def share(msg: dict, category: str) -> float:
    items = msg["items"]
    return sum(BY_ID.get(i["item_id"], {}).get("category") == category for i in items) / max(len(items), 1)


def test_clicks_on_one_category_dominate_the_list(harness):
    clicks = [harness.click("alice", i) for i in items_of("cooking")[:5]]
    out = harness.run(clicks)
    last = out[clicks[-1]["event_id"]]
    assert len(last["items"]) == 10
    assert share(last, "cooking") >= 0.7, last["items"]  # chance is 1/8
    # the interest distribution is concentrated on the clicked category
    profile, _ = harness.profile("alice", lambda p, forgotten: p.clicks == 5)
    assert max(profile.interest, key=profile.interest.get) == "cooking"


@pytest.mark.every_index
def test_a_query_moves_the_list_toward_its_topic(harness):
    clicks = [harness.click("bob", i) for i in items_of("football")[:4]]
    before = harness.run(clicks)[clicks[-1]["event_id"]]
    q = harness.query("bob", "stargazing telescope planets and galaxies at night")
    after = harness.run([q])[q["event_id"]]
    assert share(after, "astronomy") > share(before, "astronomy")
    assert share(after, "astronomy") >= 0.3, after["items"]
    assert any(i["reason"].startswith("matches your search") for i in after["items"])


@pytest.mark.every_index
def test_seen_items_never_come_back_and_deleted_items_never_appear(harness):
    jazz = items_of("jazz")
    first = [harness.click("carol", i) for i in jazz[:3]]
    out = harness.run(first)
    seen: set[str] = set()
    for e in first:
        seen.add(e["item_id"])
        assert not seen & {i["item_id"] for i in out[e["event_id"]]["items"]}
    # delete the items the user would most likely get next
    recommended = [i["item_id"] for i in out[first[-1]["event_id"]]["items"]][:4]
    harness.catalog([{"type": "item_delete", "item_id": i, "timestamp": time.time()} for i in recommended])
    more = [harness.click("carol", i) for i in jazz[3:8] if i not in recommended]
    out = harness.run(more)
    for e in more:
        seen.add(e["item_id"])
        got = {i["item_id"] for i in out[e["event_id"]]["items"]}
        assert not got & seen, "a seen item came back"
        assert not got & set(recommended), "a deleted item was recommended"
    req = harness.request("carol", k=50)
    got = {i["item_id"] for i in harness.run([req])[req["request_id"]]["items"]}
    assert not got & (seen | set(recommended))


@pytest.mark.every_index
def test_a_new_item_is_recommended_right_after_its_catalog_event(harness):
    stars = items_of("astronomy")[:4]
    harness.run([harness.click("dave", i) for i in stars])
    text = " ".join(BY_ID[i]["title"] for i in stars)
    new = {"type": "item", "item_id": "brand-new-astro", "title": f"New: {text}",
           "description": " ".join(BY_ID[i]["description"] for i in stars[:2]), "category": "astronomy",
           "tags": ["new"], "scenes": [], "available": True, "timestamp": 1_700_001_000.0}
    harness.catalog([new])
    req = harness.request("dave", k=10)
    items = [i["item_id"] for i in harness.run([req])[req["request_id"]]["items"]]
    assert "brand-new-astro" in items, items


def test_unknown_user_gets_cold_start_then_a_personal_list(harness):
    # some traffic from others makes items popular
    popular = items_of("travel")[:3]
    harness.run([harness.click(f"other-{n}", i) for n in range(3) for i in popular])
    req = harness.request("newbie", k=5)
    cold = harness.run([req])[req["request_id"]]
    assert cold["cold_start"] is True
    assert [i["item_id"] for i in cold["items"][:3]] == popular or set(popular) <= {i["item_id"] for i in cold["items"]}
    assert {i["reason"] for i in cold["items"]} <= {"popular now", "new in the catalog"}
    click = harness.click("newbie", items_of("gardening")[0])
    warm = harness.run([click])[click["event_id"]]
    assert warm["cold_start"] is False
    assert share(warm, "gardening") >= 0.5, warm["items"]
    assert [i["item_id"] for i in warm["items"]] != [i["item_id"] for i in cold["items"]]


def test_every_recommendation_has_a_reason_and_its_trigger(harness):
    events = [harness.click("erin", items_of("programming")[0]), harness.query("erin", "python unit testing tips"),
              harness.click("erin", items_of("programming")[1], scene="mobile"), harness.click("frank", items_of("fitness")[0])]
    out = harness.run(events)
    for e in events:
        msg = out[e["event_id"]]
        assert msg["trigger_event_id"] == e["event_id"]
        assert msg["user_id"] == e["user_id"]
        assert msg["trigger_type"] == e["type"]
        assert msg["schema"] == "streamrec.v1.Recommendations"
        assert msg["encoder"] and msg["model_version"]
        assert msg["produced_time"] >= msg["event_time"]
        assert msg["items"] and all(i["reason"].strip() for i in msg["items"])
    assert any("you clicked" in i["reason"] for i in out[events[2]["event_id"]]["items"])


@pytest.mark.every_index
def test_scenes_give_scene_specific_lists(harness):
    cooking, football = items_of("cooking"), items_of("football")
    events = []
    for n in range(4):
        events.append(harness.click("gina", cooking[n], scene="tv"))
        events.append(harness.click("gina", football[n], scene="mobile"))
    harness.run(events)
    tv, mobile = harness.request("gina", k=10, scene="tv"), harness.request("gina", k=10, scene="mobile")
    out = harness.run([tv, mobile])
    tv_list, mobile_list = out[tv["request_id"]], out[mobile["request_id"]]
    assert share(tv_list, "cooking") > share(tv_list, "football")
    assert share(mobile_list, "football") > share(mobile_list, "cooking")
    assert [i["item_id"] for i in tv_list["items"]] != [i["item_id"] for i in mobile_list["items"]]


BAD = {
    "bad_json": b'{"type": "click", "event_id": ',
    "missing_field": b'{"type": "click", "event_id": "x1", "user_id": "hank", "timestamp": 1}',
    "wrong_type": b'{"type": "click", "event_id": "x2", "user_id": "hank", "item_id": 7, "timestamp": 1}',
    "unknown_item": b'{"type": "click", "event_id": "x3", "user_id": "hank", "item_id": "nope", "timestamp": 1}',
    "too_long": json.dumps({"type": "query", "event_id": "x4", "user_id": "hank", "text": "x" * 5000,
                            "timestamp": 1}).encode(),
    "bad_encoding": b'\xff\xfe{"type": "click"}',
}


def test_malformed_input_goes_to_the_dead_letter_topic_and_counts_balance(harness):
    valid = [harness.click("hank", items_of("travel")[n]) for n in range(3)] + [harness.query("hank", "cheap flights")]
    harness.send(valid[:2], raw=[(b"hank", v) for v in BAD.values()])
    harness.send(valid[2:])
    answered = read_outputs(harness.log, harness.settings.topic_recommendations, [e["event_id"] for e in valid], 60)
    assert set(answered) == {e["event_id"] for e in valid}
    assert all(len(v) == 1 for v in answered.values())
    dead = harness.log.read(harness.settings.topic_deadletter, until=lambda r: len(r) >= len(BAD), timeout_s=60)
    letters = [json.loads(r.value) for r in dead]
    assert sorted(d["error"] for d in letters) == sorted(BAD)
    for d in letters:
        assert d["reason"] and d["source_topic"] == harness.settings.topic_events
        assert base64.b64decode(d["value_b64"]) == BAD[d["error"]]
    wait_stat(harness.redis, harness.prefix, "dead_letters", len(BAD), 60)
    stats = wait_stat_all(harness, {"events_applied": len(valid), "recommendations_out": len(valid)})
    assert stats["events_applied"] == len(valid) == stats["recommendations_out"]
    assert stats["dead_letters"] == len(BAD)
    assert stats["events_in"] == len(valid) + len(BAD)
    assert harness.worker.alive()


def test_the_same_event_twice_changes_the_profile_once(harness):
    e = harness.click("ivy", items_of("fitness")[0], event_id="dup-1")
    harness.run([e])
    harness.profile("ivy", lambda p, forgotten: p.clicks == 1)
    before = harness.redis.get(f"{harness.prefix}:{{u:ivy}}")
    again = dict(e)
    harness.send([again])
    second = harness.log.read(harness.settings.topic_recommendations,
                              until=lambda r: sum(json.loads(x.value)["trigger_event_id"] == "dup-1" for x in r) >= 2,
                              timeout_s=60)
    dups = [json.loads(x.value) for x in second if json.loads(x.value)["trigger_event_id"] == "dup-1"]
    assert [m["duplicate"] for m in dups] == [False, True]
    after = harness.redis.get(f"{harness.prefix}:{{u:ivy}}")
    assert before == after
    profile, _ = codec.decode("ivy", after)
    assert profile.clicks == 1 and profile.version == 1
    stats = wait_stat_all(harness, {"duplicates": 1})
    assert stats["events_applied"] == 1 and stats["duplicates"] == 1


def test_a_forgotten_user_is_deleted_gets_nothing_and_starts_afresh_on_return(harness):
    r = harness.redis
    key = f"{harness.prefix}:{{u:gina}}"
    clicks = [harness.click("gina", i) for i in items_of("jazz")[:3]]
    harness.run(clicks)
    assert harness.profile("gina", lambda p, forgotten: p.clicks == 3)[0].clicks == 3
    forget = {"type": "forget", "event_id": harness.next_id(), "user_id": "gina", "timestamp": time.time()}
    req = harness.request("gina", k=5)
    harness.send([forget])
    wait_stat(r, harness.prefix, "users_forgotten", 1, 60, harness.worker)
    tomb, forgotten = harness.profile("gina", lambda p, forgotten: forgotten)
    # only a tombstone is left: no vectors, history, interests or seen items, and it expires
    assert forgotten and tomb.is_cold and not tomb.seen and not tomb.history and not tomb.interest
    assert 0 < r.pttl(key) <= harness.settings.forget_ttl_s * 1000
    after = harness.run([req])[req["request_id"]]
    assert after["cold_start"] is True  # nothing personal is left to recommend from
    recs = read_outputs(harness.log, harness.settings.topic_recommendations, [c["event_id"] for c in clicks], 30)
    assert forget["event_id"] not in recs  # a forget produces no list
    back = harness.click("gina", items_of("cooking")[0])
    again = harness.run([back])[back["event_id"]]
    assert again["cold_start"] is False
    p, forgotten = harness.profile("gina", lambda p, forgotten: not forgotten)
    assert not forgotten and p.clicks == 1 and len(p.seen) == 1 and r.pttl(key) == -1  # a new profile, from the return only
    assert [h["item_id"] for h in p.history] == [items_of("cooking")[0]]


def test_a_running_worker_serves_metrics_and_health(stack, tmp_path):
    """/metrics counts every event of the stream, with time in each stage, the worker's counters
    and dead letters by code; /health names the agents; /ready says the worker holds its partitions."""
    import urllib.request

    from streams.metrics import parse_metrics
    from tests.integration.conftest import CATALOG, Harness
    from workers.stack import free_port, wait_for

    port = free_port()
    h = Harness(stack, tmp_path, metrics_port=port)
    try:
        h.catalog(CATALOG)
        clicks = [h.click(f"m{n % 3}", i) for n, i in enumerate(items_of("jazz")[:6])]
        h.run(clicks + [h.query("m0", "late night jazz piano")])

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        # a batch counts once written, just after its lists are out
        wait_for(lambda: parse_metrics(get("/metrics")[1]).get("streamrec_events_total", 0) >= 7, "events counted",
                 30, h.worker.proc, h.worker.log_path)
        got = parse_metrics(get("/metrics")[1])
        assert got["streamrec_events_total"] == 7 and got["streamrec_batches_total"] >= 1
        for stage in ("parse", "redis", "milvus", "encoder", "ranking", "process", "publish", "commit", "batch"):
            assert got[f'streamrec_stage_seconds_count{{stage="{stage}"}}'] > 0, stage
        # the worker's counters, as `streamrec stats` has them, and dead letters by code
        h.send([], raw=[(b"m0", b"{not json")])
        wait_for(lambda: parse_metrics(get("/metrics")[1]).get('streamrec_stats_total{name="dead_letters"}', 0) >= 1,
                 "the dead letter counted", 30, h.worker.proc, h.worker.log_path)
        got = parse_metrics(get("/metrics")[1])
        stats = h.stats()
        for name in ("events_in", "events_applied", "dead_letters", "recommendations_out", "items_upserted"):
            assert got[f'streamrec_stats_total{{name="{name}"}}'] == stats[name], name
        assert got['streamrec_stats_total{name="events_in"}'] == 8 and stats["events_applied"] == 7
        assert got['streamrec_dead_letters_total{error="bad_json"}'] == 1
        assert all(got[f'streamrec_agent_up{{agent="{a}"}}'] == 1 for a in ("catalog", "events", "requests"))
        status, body = get("/health")
        health = json.loads(body)
        assert status == 200 and health["ok"], health
        assert health["agents"] == {"catalog": "running", "events": "running", "requests": "running"}
        # consumer lag per assigned partition, at scrape time: nothing left once the offsets are committed
        def lags() -> dict[str, float]:
            return {k: v for k, v in parse_metrics(get("/metrics")[1]).items() if k.startswith("streamrec_consumer_lag")}

        wait_for(lambda: len(lags()) == 3 * h.settings.topic_partitions and sum(lags().values()) == 0,
                 "every partition's lag at 0", 30, h.worker.proc, h.worker.log_path)
        assert f'streamrec_consumer_lag{{partition="0",topic="{h.settings.topic_events}"}}' in lags()
        status, body = get("/ready")
        ready = json.loads(body)
        assert status == 200 and ready["ok"] and ready["partitions"] == 3 * h.settings.topic_partitions, ready
        assert ready["stores"] == {"redis": "ok", "milvus": "ok"}
        assert parse_metrics(get("/metrics")[1])["streamrec_items"] == len(CATALOG)
    finally:
        h.close()
