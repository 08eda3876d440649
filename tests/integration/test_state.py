"""The state redesign on real servers: clicks that arrive while their catalog is still being
indexed wait for it, and a worker whose state lives on a Redis Cluster."""

from __future__ import annotations

import time

import pytest

from workers import demo_data
from workers.runner import encode_line, read_outputs, wait_stat

from .conftest import CATALOG, Harness, items_of

pytestmark = pytest.mark.integration


@pytest.mark.every_broker
def test_clicks_sent_while_the_catalog_is_being_indexed_wait_for_it(stack, tmp_path):
    """As a new user would: a worker, then 480 catalog items, then at once 400 clicks on them (the
    catalog takes seconds to encode, so the clicks arrive while it is being indexed). The events
    agent must not run ahead of the catalog: every click is applied, none is dead-lettered as an
    unknown item."""
    h = Harness(stack, tmp_path)
    try:
        catalog = demo_data.build_catalog(480)
        h.log.publish(h.settings.topic_catalog, [(*encode_line(it), None) for it in catalog])
        now = time.time()
        clicks = [{"type": "click", "event_id": f"c{n}", "user_id": f"u{n % 97}",
                   "item_id": catalog[(n * 7919) % len(catalog)]["item_id"], "timestamp": now} for n in range(400)]
        h.send(clicks)
        read_outputs(h.log, h.settings.topic_recommendations, [c["event_id"] for c in clicks], 300, h.worker)
        # a batch's lists are out before its effects and stats are applied: wait for those too
        wait_stat(h.redis, h.prefix, "events_in", len(clicks), 120, h.worker)
        stats = h.stats()
        assert stats["dead_letters"] == 0, stats
        assert stats["events_applied"] == len(clicks) and stats["items_upserted"] == len(catalog), stats
    finally:
        h.close()


@pytest.mark.cluster
def test_a_worker_keeps_its_state_on_a_redis_cluster(embedded, tmp_path, redis_cluster):
    """On the embedded broker only: what is under test is the Redis Cluster."""
    h = Harness(embedded, tmp_path, redis_url=redis_cluster.url, redis_wait_replicas=1)
    try:
        h.catalog(CATALOG)
        clicks = [h.click(f"user-{n % 5}", item) for n, item in enumerate(items_of("cooking")[:6] + items_of("jazz")[:4])]
        out = h.run(clicks)
        assert all(len(out[c["event_id"]]["items"]) == 10 for c in clicks)
        wait_stat(h.redis, h.prefix, "events_applied", len(clicks), 60, h.worker)
        # a batch's effects (and its counters) are written before its profiles: wait for those too
        p, _ = h.profile("user-0", lambda p, forgotten: p.clicks == 2)
        assert p.clicks == 2 and len(p.seen) == 2
        req = h.request("user-0", k=5)
        got = h.run([req])[req["request_id"]]
        assert not got["cold_start"] and len(got["items"]) == 5
        # the request's list is out before its batch's counters are written: wait for those
        wait_stat(h.redis, h.prefix, "requests_answered", 1, 60, h.worker)
        stats = h.stats()
        assert stats["events_applied"] == len(clicks) and stats["requests_answered"] == 1
        assert 0 < h.redis.memory_usage(f"{h.prefix}:{{u:user-0}}") < 4096
    finally:
        h.close()
