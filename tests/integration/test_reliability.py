"""Nothing lost, nothing applied twice: a worker killed mid-stream, workers joining and leaving a
group, Redis crashing and Milvus going away (the broker's own scenarios on every broker under test, the
stores' on the first). Each scenario audits
every event (applied exactly once to its user's profile, at least one list on the output topic)
and adds its figures to the session's reliability report."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas import Limits
from tests.hostile import hostile
from workers.milvus_server import MilvusStandalone
from workers.runner import WorkerProcess
from workers.settings import Settings
from workers.stack import wait_for

from .conftest import CATALOG, Harness, items_of
from .reliability import (DurableRedis, MilvusServer, Stream, audit, count_answers, crashes_in,
                          wait_members)

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

CATEGORIES = sorted({it["category"] for it in CATALOG})
QUERIES = ["space adventure", "quiet piano music", "spicy street food", "mountain hiking gear",
           "vintage cameras", "football highlights", "baking bread", "jazz standards"]


def make_stream(rng: random.Random, n_events: int, n_users: int, tag: str, forgets: float = 0.0) -> list[dict]:
    """Clicks (80%) within each user's two favourite categories, and queries, in a fixed order;
    with ``forgets``, that share of the events are forget-user requests."""
    favourite = {f"{tag}-u{u:02d}": rng.sample(CATEGORIES, 2) for u in range(n_users)}
    users = list(favourite)
    events = []
    for i in range(n_events):
        u = rng.choice(users)
        base = {"event_id": f"{tag}-{i:05d}", "user_id": u, "timestamp": time.time()}
        if rng.random() < forgets:
            events.append({"type": "forget", **base})
        elif rng.random() < 0.8:
            events.append({"type": "click", **base, "item_id": rng.choice(items_of(rng.choice(favourite[u])))})
        else:
            events.append({"type": "query", **base, "text": rng.choice(QUERIES)})
    return events


def seed_for(name: str) -> int:
    """The run's random seed: ``STREAMREC_TEST_SEED`` to repeat a run, else a fresh one (reported)."""
    return int(os.environ.get("STREAMREC_TEST_SEED") or random.SystemRandom().randrange(2**31))


def spaced_points(rng: random.Random, lo: int, hi: int, n: int, gap: int) -> list[int]:
    """``n`` random points in ``[lo, hi)``, sorted, at least ``gap`` apart: a worker restarted
    after one kill has applied events of its own before the next (the kill lands on a worker at
    work, not one still starting)."""
    free = hi - lo - (n - 1) * gap
    return [lo + x + i * gap for i, x in enumerate(sorted(rng.sample(range(free), n)))]


def finish(h: Harness, events: list[dict], workers: list[WorkerProcess], timeout_s: float = 180) -> dict:
    """Wait for a list of every event, then audit."""
    alive = lambda: any(w.alive() for w in workers)  # noqa: E731
    answers = count_answers(h.log, h.settings.topic_recommendations,
                            {e["event_id"] for e in events if e["type"] != "forget"}, timeout_s, alive)
    return audit(h.redis, h.prefix, events, answers)


def assert_exactly_once(fig: dict) -> None:
    assert fig["lost"] == 0, fig
    assert fig["applied_twice"] == 0, fig
    assert fig["counters_off_by"] == 0, fig
    assert fig["lists_differing"] == 0 and fig["duplicate_first"] == 0, fig
    assert fig["applied_once"] == fig["events_sent"], fig
    assert fig["unanswered"] == 0, fig
    assert fig["crashes"] == 0, fig


@pytest.mark.every_broker
def test_kill9_worker_mid_stream(stack, tmp_path, reliability):
    """SIGKILL the worker at 5 random points of one stream, restarting it each time."""
    seed = seed_for("kill")
    rng = random.Random(seed)
    # small batches: many commits per second, so kills land between a commit and its ack
    h = Harness(stack, tmp_path, batch_max=16)
    try:
        h.catalog(CATALOG)
        events = make_stream(rng, 600, 24, "k", forgets=0.02)
        kill_at = spaced_points(rng, 40, len(events) - 40, 5, gap=48)
        workers = [h.worker]
        applied_at_kill: list[int] = []

        def kill_and_restart() -> None:
            h.worker.kill()
            applied_at_kill.append(Stream(h, events).progress())
            h.worker = WorkerProcess(h.settings, tmp_path / "worker.log").start()
            workers.append(h.worker)


        Stream(h, events, hooks=[(k, kill_and_restart) for k in kill_at]).run()
        fig = finish(h, events, workers)
        stats = h.stats()
        fig.update(kills=len(kill_at), kill_points=kill_at, applied_at_kill=applied_at_kill, seed=seed,
                   redelivered=stats.get("redelivered", 0), forgets=sum(e["type"] == "forget" for e in events),
                   crashes=crashes_in(h.worker.log_path.read_text(errors="replace")))
        reliability.add(h.broker, "kill -9 worker x5", fig)
        assert_exactly_once(fig)
        assert len(workers) == 6
    finally:
        h.close()


@pytest.mark.every_broker
def test_two_workers_one_leaves_and_returns(stack, tmp_path, reliability):
    """Two workers share 6 partitions; one stops and comes back (2 -> 1 -> 2) mid-stream."""
    seed = seed_for("rebalance")
    rng = random.Random(seed)
    h = Harness(stack, tmp_path, topic_partitions=6, kafka_rebalance_timeout_s=10.0)
    second = WorkerProcess(h.settings, tmp_path / "worker-2.log").start()
    workers = [h.worker, second]
    try:
        h.catalog(CATALOG)
        events = make_stream(rng, 600, 24, "r")
        members = lambda n: wait_members(stack.kafka_bootstrap, h.settings.app_id,  # noqa: E731
                                         h.settings.topic_events, n)
        # partitions of the events topic per member, in each phase (where the broker can tell)
        phases = {"2 workers": members(2)}

        def leave() -> None:
            workers[1].stop()
            phases["1 worker"] = members(1)

        def come_back() -> None:
            workers[1] = WorkerProcess(h.settings, tmp_path / "worker-2.log").start()
            phases["2 workers again"] = members(2)


        Stream(h, events, hooks=[(200, leave), (400, come_back)]).run()
        fig = finish(h, events, workers)
        logs = h.worker.log_path.read_text(errors="replace") + (tmp_path / "worker-2.log").read_text(errors="replace")
        fig.update(rebalances=2, partitions=6, partitions_per_member=phases, seed=seed, crashes=crashes_in(logs),
                   redelivered=h.stats().get("redelivered", 0))
        reliability.add(h.broker, "2 -> 1 -> 2 workers", fig)
        assert_exactly_once(fig)
        assert all(w.alive() for w in workers)
    finally:
        for w in workers:
            w.stop()
        h.close()


@pytest.mark.every_index
def test_redis_crash_and_milvus_outage(stack, tmp_path, reliability):
    """Redis is killed and restarted mid-stream, later Milvus is stopped for a while: the worker
    retries with backoff, acks nothing it has not applied, and catches up. On Milvus Lite, and on
    Milvus standalone (a token, HNSW) as ``[milvus-standalone]``."""
    seed = seed_for("outage")
    rng = random.Random(seed)
    standalone = getattr(stack, "milvus", None) is not None
    own_milvus = MilvusStandalone(tmp_path / "milvus") if standalone else MilvusServer(tmp_path / "milvus")
    with DurableRedis(tmp_path / "redis") as r, own_milvus as m:
        # short Milvus calls and item cache: the outage shows within seconds
        h = Harness(stack, tmp_path, redis_url=r.url, milvus_uri=m.uri, item_cache_ttl_s=1.0, milvus_timeout_s=5.0,
                    milvus_token=getattr(m, "token", ""))
        try:
            h.catalog(CATALOG)
            events = make_stream(rng, 600, 24, "o")
            outages: list[dict] = []

            def retries() -> int:
                return len(re.findall(r"failed \(.*\); retry", h.worker.log_path.read_text(errors="replace")))

            def outage(server, what: str, restart, tries: int) -> None:
                before = retries()
                t0 = time.monotonic()
                server.down()
                # wait until the worker has met the outage (its retry warnings), then bring it back
                wait_for(lambda: retries() >= before + tries, f"{tries} worker retries during the {what} outage",
                         120, h.worker.proc, h.worker.log_path)
                restart()
                outages.append({"service": what, "down_s": round(time.monotonic() - t0, 2),
                                "retries": retries() - before})

            def redis_crash() -> None:
                h.redis.close()
                outage(r, "redis (SIGKILL)", r.start, 5)

            def milvus_outage() -> None:
                # Milvus Lite's calls fail fast, so a longer outage; the server's wait on each call
                outage(m, "milvus (SIGKILL)", m.start, 3 if standalone else 8)


            Stream(h, events, hooks=[(200, redis_crash), (400, milvus_outage)]).run()
            fig = finish(h, events, [h.worker])
            fig.update(outages=len(outages), outage_detail=outages, seed=seed,
                       crashes=crashes_in(h.worker.log_path.read_text(errors="replace")),
                       worker_restarts=0)
            reliability.add(h.broker, "redis crash + milvus standalone outage" if standalone else
                            "redis crash + milvus outage", fig)
            assert_exactly_once(fig)
            assert len(outages) == 2
        finally:
            h.close()


BAD_INPUTS = int(os.environ.get("STREAMREC_TEST_BAD_INPUTS") or 10_000)
PER_EXAMPLE = 25


@pytest.fixture(scope="session")
def hostile_examples() -> list[tuple]:
    """Hypothesis's malformed and hostile messages for all three input topics (see
    ``tests/hostile.py``), ``BAD_INPUTS`` of them in examples of ``PER_EXAMPLE``: each example is
    (messages, where the valid events go among them, the item they click). Drawn once per session,
    so every broker gets the same messages (timestamps made invalid are an hour past the limit)."""
    limits = Limits.from_settings(Settings())
    item_ids = tuple(it["item_id"] for it in CATALOG)
    drawn: list[tuple] = []

    @settings(max_examples=BAD_INPUTS // PER_EXAMPLE, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(hostile(limits, time.time(), item_ids), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE),
           at=st.integers(0, PER_EXAMPLE), item=st.sampled_from(item_ids))
    def draw(batch, at, item):
        drawn.append((batch, at, item))

    draw()
    return drawn


@pytest.mark.every_broker
def test_hostile_input_is_dead_lettered(stack, tmp_path, reliability, hostile_examples):
    """Malformed and hostile messages (``hostile_examples``) for all three input topics, and with
    them valid clicks and requests of users never seen before. Every hostile message lands in the
    dead-letter topic with its reason and its exact bytes, every valid one is answered, and the
    worker never dies."""
    h = Harness(stack, tmp_path)
    try:
        h.catalog(CATALOG)
        topics = {"events": h.settings.topic_events, "catalog": h.settings.topic_catalog,
                  "requests": h.settings.topic_requests}
        producer = h.log.producer()
        sent: list[tuple] = []  # (future, Hostile)
        valid: list[dict] = []
        for batch, at, item in hostile_examples:
            n = len(valid)
            good = [h.click(f"new-user-{n}", item), h.request(f"new-user-{n + 1}", k=5)]
            for m in batch[:at]:
                sent.append((producer.send(topics[m.topic], key=m.key, value=m.value), m))
            h.send(good)
            for m in batch[at:]:
                sent.append((producer.send(topics[m.topic], key=m.key, value=m.value), m))
            valid.extend(good)
            assert h.worker.alive(), h.worker.log_tail()
        producer.flush()
        where = {}
        for fut, m in sent:
            md = fut.get(timeout=60)
            where[(md.topic, md.partition, md.offset)] = m
        want_ids = {e.get("event_id") or e["request_id"] for e in valid}
        dead: dict[tuple, dict] = {}
        answered: set[str] = set()
        deadline = time.monotonic() + 600
        for batch in h.log.tail([h.settings.topic_deadletter, h.settings.topic_recommendations],
                                timeout_s=600):
            for rec in batch:
                msg = json.loads(rec.value)
                if rec.topic == h.settings.topic_deadletter:
                    dead.setdefault((msg["source_topic"], msg["partition"], msg["offset"]), msg)
                else:
                    answered.add(msg["trigger_event_id"])
            if (len(dead) >= len(where) and want_ids <= answered) or not h.worker.alive() \
                    or time.monotonic() > deadline:
                break
        lettered = [k for k in where if k in dead]
        exact = sum(base64.b64decode(dead[k]["value_b64"]) == (where[k].value or b"") and bool(dead[k]["reason"])
                    for k in lettered)
        faults = Counter(m.fault for m in where.values())
        errors = Counter(dead[k]["error"] for k in lettered)
        fig = {"bad_inputs_tried": len(where), "dead_lettered": len(lettered), "dead_lettered_exact": exact,
               "dead_letters_for_valid_input": len(set(dead) - set(where)),
               "valid_sent": len(valid), "valid_answered": len(want_ids & answered),
               "crashes": crashes_in(h.worker.log_path.read_text(errors="replace")) + (not h.worker.alive()),
               "faults": dict(sorted(faults.items())), "errors": dict(sorted(errors.items()))}
        reliability.add(h.broker, "hostile input (hypothesis)", fig)
        assert fig["bad_inputs_tried"] >= BAD_INPUTS, fig
        assert fig["dead_lettered"] == fig["bad_inputs_tried"] == fig["dead_lettered_exact"], fig
        assert fig["dead_letters_for_valid_input"] == 0, fig
        assert fig["valid_answered"] == fig["valid_sent"], fig
        assert fig["crashes"] == 0, fig
        assert h.worker.alive()
    finally:
        h.close()


@pytest.mark.cluster
def test_redis_cluster_master_failover(embedded, tmp_path, reliability, redis_cluster):
    """The worker's state lives on a Redis Cluster (3 masters, 3 replicas); mid-stream the master
    holding the most users is SIGKILLed and its replica promoted. Writes wait for a replica (WAIT)
    before events are acked, so nothing is lost, and nothing is applied twice. On the embedded
    broker only: what is under test is the Redis Cluster."""
    stack = embedded
    seed = seed_for("failover")
    rng = random.Random(seed)
    h = Harness(stack, tmp_path, redis_url=redis_cluster.url, redis_wait_replicas=1)
    killed: list[dict] = []
    try:
        h.catalog(CATALOG)
        events = make_stream(rng, 600, 24, "f")
        users = sorted({e["user_id"] for e in events})

        def failover() -> None:
            by_master: dict[int, int] = {}
            for u in users:
                port = redis_cluster.master_of(f"{h.prefix}:{{u:{u}}}")
                by_master[port] = by_master.get(port, 0) + 1
            port = max(by_master, key=by_master.get)
            key = next(f"{h.prefix}:{{u:{u}}}" for u in users if redis_cluster.master_of(f"{h.prefix}:{{u:{u}}}") == port)
            killed.append({"service": "redis cluster master (SIGKILL)", **redis_cluster.kill_master_of(key),
                           "users_on_it": by_master[port]})

        Stream(h, events, hooks=[(300, failover)]).run()
        fig = finish(h, events, [h.worker])
        fig.update(outages=len(killed), outage_detail=[{**k, "down_s": k["failover_s"]} for k in killed], seed=seed,
                   crashes=crashes_in(h.worker.log_path.read_text(errors="replace")), worker_restarts=0)
        reliability.add(h.broker, "redis cluster master failover", fig)
        assert_exactly_once(fig)
        assert len(killed) == 1 and h.worker.alive()
    finally:
        h.close()
        for k in killed:  # the old master comes back as a replica, for the tests after this one
            redis_cluster.restart(k["killed_port"])


def test_an_error_no_retry_fixes_stops_the_worker_with_a_status_to_restart_it(stack, tmp_path):
    """Someone drops the Milvus collection under a running worker: the next search fails for good.
    The worker is not left running with a dead agent (nor retrying forever): it says why, stops,
    and exits with status 70, for an orchestrator to restart it from its committed offsets."""
    from streams.app import EXIT_AGENT_CRASHED
    from streams.stores.milvus_items import milvus_client

    h = Harness(stack, tmp_path)
    try:
        h.catalog(CATALOG)
        first = h.click("drop-1", items_of("jazz")[0])
        assert h.run([first])[first["event_id"]]["items"]
        client = milvus_client(h.settings.milvus_uri, h.settings.milvus_token.get_secret_value())
        client.drop_collection(h.settings.milvus_collection)
        client.close()
        h.send([h.click("drop-2", items_of("jazz")[1])])
        wait_for(lambda: not h.worker.alive(), "the worker to stop", 60)
        log = h.worker.log_path.read_text(errors="replace")
        assert h.worker.proc.returncode == EXIT_AGENT_CRASHED, log[-3000:]
        assert "events agent stopped on an error that no retry fixes" in log, log[-3000:]
        assert "streamrec worker: stopped: events agent: MilvusException: <MilvusException: (code=100" in log, log[-3000:]
        assert h.stats().get("events_applied") == 1  # the failed batch is not acked, nor applied
    finally:
        h.close()
