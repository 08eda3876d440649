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
