"""The worker's metrics: stage timing of store, index and encoder calls, and their exposition."""

from __future__ import annotations

import asyncio

import pytest

from streams.metrics import STAGES, Metrics, Timed, parse_metrics


class Store:
    def __init__(self) -> None:
        self.version = "v1"

    async def load(self, ids):
        await asyncio.sleep(0)
        return {i: i.upper() for i in ids}

    def search(self, q, limit):
        return [q] * limit

    def _private(self):
        return "untimed"


def test_timed_calls_count_in_their_stage_and_return_what_the_target_returns():
    m = Metrics()
    store = Timed(Store(), m, "redis")
    index = Timed(Store(), m, "milvus")
    assert asyncio.run(store.load(["a", "b"])) == {"a": "A", "b": "B"}
    assert index.search("q", 3) == ["q", "q", "q"]
    assert index.search("q", 1) == ["q"]
    assert store.version == "v1" and store._private() == "untimed"
    snap = m.snapshot()
    assert snap["calls"]["redis"] == 1 and snap["calls"]["milvus"] == 2 and snap["calls"]["encoder"] == 0
    assert snap["seconds"]["redis"] > 0


def test_exposition_parses_back_with_every_stage_and_the_batch_counters():
    m = Metrics()
    with m.stage("ranking"):
        pass
    m.add("publish", 0.25)
    m.batch(7)
    m.batch(3)
    got = parse_metrics(m.render())
    assert got["streamrec_events_total"] == 10 and got["streamrec_batches_total"] == 2
    assert got['streamrec_stage_seconds_sum{stage="publish"}'] == pytest.approx(0.25)
    assert got['streamrec_stage_seconds_bucket{le="0.5",stage="publish"}'] == 1
    assert got['streamrec_stage_seconds_bucket{le="0.1",stage="publish"}'] == 0
    assert all(f'streamrec_stage_seconds_count{{stage="{st}"}}' in got for st in STAGES)
    assert got["streamrec_last_batch_time_seconds"] == pytest.approx(m.last_batch_time)


def test_counters_dead_letters_by_code_retries_and_agents():
    m = Metrics()
    m.counted({"events_in": 5, "events_applied": 3, "dead_letters": 2, "redelivered": 0},
              ["bad_json", "unknown_item"])
    m.counted({"events_in": 1, "dead_letters": 1}, iter(["bad_json"]))
    m.retried("events commit")
    m.retried("events commit")
    m.agent("events", True)
    m.agent("catalog", False)
    got = parse_metrics(m.render())
    assert got['streamrec_stats_total{name="events_in"}'] == 6
    assert got['streamrec_stats_total{name="events_applied"}'] == 3
    assert got['streamrec_stats_total{name="redelivered"}'] == 0  # present from the start
    assert got['streamrec_dead_letters_total{error="bad_json"}'] == 2
    assert got['streamrec_dead_letters_total{error="unknown_item"}'] == 1
    assert got['streamrec_retries_total{call="events commit"}'] == 2
    assert got['streamrec_agent_up{agent="events"}'] == 1 and got['streamrec_agent_up{agent="catalog"}'] == 0
    m.lag({("t.events", 0): 5, ("t.events", 1): 0})
    m.lag({("t.events", 1): 2, ("t.catalog", 0): -1})  # a partition moved away; never below 0
    got = parse_metrics(m.render())
    lags = {k: v for k, v in got.items() if k.startswith("streamrec_consumer_lag")}
    assert lags == {'streamrec_consumer_lag{partition="1",topic="t.events"}': 2,
                    'streamrec_consumer_lag{partition="0",topic="t.catalog"}': 0}


def test_a_dead_letters_code_is_read_from_its_record():
    from streams.app import dead_letter_error

    assert dead_letter_error(b'{"schema": "streamrec.v1.DeadLetter", "error": "bad_json"}') == "bad_json"
    assert dead_letter_error(b"not json") == "unknown" and dead_letter_error(b"[1]") == "unknown"


def test_ready_is_served_apart_from_health():
    import json
    import urllib.request

    from streams.metrics import serve
    from workers.stack import free_port

    port = free_port()

    async def go():
        async def ready():
            return {"ok": False, "partitions": 0}

        runner = await serve(Metrics(), "127.0.0.1", port, lambda: {"ok": True}, ready)

        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
        try:
            return await asyncio.to_thread(get, "/health"), await asyncio.to_thread(get, "/ready")
        finally:
            await runner.cleanup()

    (hs, hb), (rs, rb) = asyncio.run(go())
    assert hs == 200 and hb["ok"] and rs == 503 and rb == {"ok": False, "partitions": 0}
