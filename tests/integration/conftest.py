"""Real services for the integration tests: one embedded stack (Tansu broker, redis-server,
Milvus Lite server) per test session; every test gets fresh topics, consumer group, Redis key
prefix and Milvus collection, and its own worker process."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

import pytest
import redis

from streams.stores.eventlog import KafkaEventLog, all_topics
from workers import demo_data
from workers.runner import WorkerProcess, encode_line, read_outputs, wait_stat
from workers.settings import Settings
from workers.stack import Stack

CATALOG = demo_data.build_catalog(160)  # 20 items in each of 8 categories
BY_ID = {it["item_id"]: it for it in CATALOG}


def items_of(category: str) -> list[str]:
    return [it["item_id"] for it in CATALOG if it["category"] == category]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


class Harness:
    """One test's worker and clients, on fresh names."""

    def __init__(self, stack: Stack, tmp: Path, **overrides) -> None:
        run = uuid.uuid4().hex[:10]
        self.settings = Settings(
            kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url, milvus_uri=stack.milvus_uri,
            app_id=f"t-{run}", key_prefix=f"t-{run}", milvus_collection=f"t_{run}",
            topic_events=f"t-{run}.events", topic_catalog=f"t-{run}.catalog", topic_requests=f"t-{run}.requests",
            topic_recommendations=f"t-{run}.recs", topic_deadletter=f"t-{run}.dlq",
            kafka_rebalance_timeout_s=3.0, kafka_session_timeout_s=10.0, data_dir=str(tmp / "data"), **overrides)
        self.log = KafkaEventLog(stack.kafka_bootstrap)
        self.log.ensure_topics(all_topics(self.settings), self.settings.topic_partitions)
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.worker = WorkerProcess(self.settings, tmp / "worker.log").start()
        self._n = 0
        self._items = 0
        self._deleted = 0

    @property
    def prefix(self) -> str:
        return self.settings.key_prefix

    def next_id(self) -> str:
        self._n += 1
        return f"e{self._n:05d}"

    # -- input --
    def catalog(self, items: Iterable[dict], timeout_s: float = 180) -> None:
        items = list(items)
        self.log.publish(self.settings.topic_catalog, [(*encode_line(it), None) for it in items])
        ups = sum(it["type"] == "item" for it in items)
        dels = len(items) - ups
        self._items += ups
        self._deleted += dels
        if ups:
            wait_stat(self.redis, self.prefix, "items_upserted", self._items, timeout_s, self.worker)
        if dels:
            wait_stat(self.redis, self.prefix, "items_deleted", self._deleted, timeout_s, self.worker)

    def click(self, user: str, item: str, scene: Optional[str] = None, event_id: Optional[str] = None) -> dict:
        return {"type": "click", "event_id": event_id or self.next_id(), "user_id": user, "item_id": item,
                "timestamp": time.time(), "scene": scene}

    def query(self, user: str, text: str, scene: Optional[str] = None) -> dict:
        return {"type": "query", "event_id": self.next_id(), "user_id": user, "text": text,
                "timestamp": time.time(), "scene": scene}

    def request(self, user: str, k: int = 10, scene: Optional[str] = None, **extra) -> dict:
        return {"type": "request", "request_id": "r-" + self.next_id(), "user_id": user, "k": k,
                "timestamp": time.time(), "scene": scene, **extra}

    def send(self, events: list[dict], raw: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Publish events (to the events or requests topic by type) and raw bad messages."""
        for e in events:
            topic = self.settings.topic_requests if e["type"] == "request" else self.settings.topic_events
            self.log.publish(topic, [(*encode_line(e), None)])
        for key, value in raw:
            self.log.publish(self.settings.topic_events, [(key, value, None)])

    def run(self, events: list[dict], timeout_s: float = 120) -> dict[str, dict]:
        """Send events and return the (first) recommendations message of each, by trigger id."""
        self.send(events)
        ids = [e.get("event_id") or e["request_id"] for e in events]
        got = read_outputs(self.log, self.settings.topic_recommendations, ids, timeout_s, self.worker)
        return {i: got[i][0] for i in ids}

    def stats(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(f"{self.prefix}:stats").items()}

    def close(self) -> None:
        self.worker.stop()
        self.log.close()
        self.redis.close()


@pytest.fixture
def harness(stack, tmp_path):
    h = Harness(stack, tmp_path)
    try:
        h.catalog(CATALOG)
        yield h
    finally:
        h.close()
