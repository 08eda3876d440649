"""Real services for the integration tests: one embedded stack (Tansu broker, redis-server,
Milvus Lite server) per test session, and Apache Kafka (4.x, KRaft, on Java 17) as a second,
reference broker. A test marked ``every_broker`` (what a broker's semantics can break: offsets
and redelivery, group rebalances, raw bytes, watermarks, recording and replay) runs on both
brokers (ids ``[tansu]`` and ``[apache-kafka]``); any other test that uses ``stack`` runs once, on
the first broker under test. A test marked ``every_index`` runs once more on a real Milvus
standalone server (id ``[milvus-standalone]``: authentication on, the HNSW index that ``deploy/``
uses), on the first broker. redis-server comes from the embedded stack either way.
Without Java 17 (or Maven, while the jars are not cached) the Apache Kafka runs are skipped, with
the reason. ``STREAMREC_TEST_BROKERS=tansu`` (or ``apache-kafka``) runs on one broker only; its
first broker is the one for single-broker tests. Every test gets fresh topics, consumer group,
Redis key prefix and Milvus collection, and its own worker process."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

from models.profile import Profile
from streams.stores.eventlog import KafkaEventLog, all_topics
from streams.stores.redis_profiles import connect, read_stats
from workers import demo_data
from workers.kafka_broker import ApacheKafka, KafkaUnavailable
from workers.runner import WorkerProcess, encode_line, read_outputs, wait_stat
from workers.settings import Settings
from workers.milvus_server import MilvusStandalone
from workers.stack import Stack, wait_for

from .reliability import ReliabilityReport, report_dir

CATALOG = demo_data.build_catalog(160)  # 20 items in each of 8 categories
BY_ID = {it["item_id"]: it for it in CATALOG}


def items_of(category: str) -> list[str]:
    return [it["item_id"] for it in CATALOG if it["category"] == category]


BROKERS = ("tansu", "apache-kafka")


def brokers_under_test() -> list[str]:
    wanted = [b.strip() for b in os.environ.get("STREAMREC_TEST_BROKERS", ",".join(BROKERS)).split(",") if b.strip()]
    unknown = set(wanted) - set(BROKERS)
    if unknown or not wanted:
        raise pytest.UsageError(f"STREAMREC_TEST_BROKERS: {sorted(unknown) or 'empty'}; choose from {BROKERS}")
    return wanted


def pytest_generate_tests(metafunc):
    # a test that needs ``stack`` (directly or through a fixture) runs on the first broker under
    # test, or on each of them when it is marked ``every_broker``; ``every_index`` adds a run on
    # Milvus standalone
    if "stack" in metafunc.fixturenames:
        brokers = brokers_under_test()
        if metafunc.definition.get_closest_marker("every_broker") is None:
            brokers = brokers[:1]
        if metafunc.definition.get_closest_marker("every_index") is not None:
            brokers = [*brokers, STANDALONE]
        metafunc.parametrize("stack", brokers, indirect=True, scope="session")


STANDALONE = "milvus-standalone"


def server_group(item: pytest.Item) -> Optional[str]:
    """The session server only some tests need, so that ``make test``'s test processes
    (``--dist loadgroup``) start each of them in one process only: Apache Kafka (and the hostile
    messages, drawn once for both brokers), Milvus standalone, the Redis Cluster."""
    names = set(getattr(item, "fixturenames", ()))
    # a parameter naming the server counts too: the contract suites' ``url``, ``index`` and
    # ``milvus`` reach it through getfixturevalue, which the fixture names do not show
    params = {v for v in getattr(getattr(item, "callspec", None), "params", {}).values() if isinstance(v, str)}
    if "apache-kafka" in params or "apache_kafka" in names or "hostile_examples" in names:
        return "apache-kafka"
    if STANDALONE in params or "milvus_standalone" in names:
        return STANDALONE
    if "redis-cluster" in params or "redis_cluster" in names:
        return "redis-cluster"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Marks each test's session server group before the other hooks run. In a ``--dist
    loadgroup`` test process pytest-xdist then names the group in the test's id (what keeps the
    server in one process); a pytest whose ids it cannot extend would start the server in every
    process, so that stops the run."""
    for item in items:
        group = server_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if server_group(item) and "@" not in item.nodeid]
        if lost:
            why = (f"pytest-xdist did not group {len(lost)} tests by session server (e.g. {lost[0]}): "
                   "check the pinned pytest and pytest-xdist")
            print(why, file=sys.__stderr__, flush=True)  # a test process's error is not shown itself
            raise pytest.UsageError(why)
    return result


@dataclass
class BrokerStack:
    """The embedded stack's redis-server and Milvus Lite with another Kafka broker, or the
    embedded stack with another Milvus: what tests see as ``stack`` (the attributes of
    :class:`Stack`, and the Milvus token and index type a worker needs)."""

    services: Stack
    kafka_bootstrap: str
    broker: str
    milvus: Optional["MilvusStandalone"] = None

    @property
    def redis_url(self) -> str:
        return self.services.redis_url

    @property
    def milvus_uri(self) -> str:
        return self.milvus.uri if self.milvus else self.services.milvus_uri

    @property
    def milvus_token(self) -> str:
        return self.milvus.token if self.milvus else ""

    @property
    def milvus_index_type(self) -> str:
        return "HNSW" if self.milvus else "FLAT"

    @property
    def versions(self) -> dict[str, str]:
        extra = {"milvus": f"standalone {self.milvus.version}"} if self.milvus else {}
        return {**self.services.versions, "broker": self.broker, **extra}

    def env(self) -> dict[str, str]:
        out = {**self.services.env(), "STREAMREC_KAFKA_BOOTSTRAP": self.kafka_bootstrap}
        if self.milvus:
            out.update(STREAMREC_MILVUS_URI=self.milvus.uri, STREAMREC_MILVUS_TOKEN=self.milvus.token,
                       STREAMREC_MILVUS_INDEX_TYPE="HNSW")
        return out


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """Tansu, redis-server and the Milvus Lite server."""
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="session")
def reliability():
    """The session's reliability figures, written to ``STREAMREC_REPORT_DIR`` (default
    ``reports/``) when the session ends."""
    report = ReliabilityReport()
    yield report
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # one of several test processes: the controller merges
    path = report.write(report_dir(), part=worker)
    if path is not None and worker is None:
        print(f"\nreliability report: {path}\n{report.text()}")


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory, reliability):
    """Apache Kafka, started once per session; skipped (with what is missing) without Java 17+,
    or without Maven while its jars are not cached."""
    broker = ApacheKafka(tmp_path_factory.mktemp("apache-kafka"))
    try:
        broker.check()
    except KafkaUnavailable as exc:
        reason = f"Apache Kafka {broker.version} not started: {exc}"
        reliability.skipped(f"apache-kafka {broker.version}", reason)
        pytest.skip(reason)
    with broker:
        yield broker


@pytest.fixture(scope="session")
def milvus_standalone(tmp_path_factory):
    """A real Milvus standalone server (PyPI ``milvus``), authentication on, once per session;
    tests keep apart by collection."""
    from workers.milvus_server import MilvusUnavailable

    try:
        server = MilvusStandalone(tmp_path_factory.mktemp("milvus-standalone"))
    except MilvusUnavailable as exc:
        pytest.skip(f"Milvus standalone not started: {exc}")
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real Redis Cluster (3 masters, 3 replicas) from the same redis-server binary, once per
    session; tests keep apart by key prefix. A test that kills a master restarts it."""
    from workers.redis_cluster import RedisCluster

    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def stack(request, embedded):
    """The services a test runs on; its Kafka broker is the test's parameter (``tansu`` when the
    test was not parametrized, e.g. a ``request.getfixturevalue("stack")``)."""
    broker = getattr(request, "param", "tansu")
    if broker == STANDALONE:
        broker = brokers_under_test()[0]  # Milvus standalone with the first broker
        on = embedded if broker == "tansu" else request.getfixturevalue("apache_kafka")
        bootstrap = on.kafka_bootstrap if broker == "tansu" else on.bootstrap
        name = embedded.versions.get("broker", "tansu") if broker == "tansu" else f"apache-kafka {on.version}"
        return BrokerStack(embedded, bootstrap, name, request.getfixturevalue("milvus_standalone"))
    if broker == "tansu":
        return embedded
    k = request.getfixturevalue("apache_kafka")
    return BrokerStack(embedded, k.bootstrap, f"apache-kafka {k.version}")


class Harness:
    """One test's worker and clients, on fresh names."""

    def __init__(self, stack: Stack | BrokerStack, tmp: Path, **overrides) -> None:
        run = uuid.uuid4().hex[:10]
        self.tmp = tmp
        self.broker = stack.versions.get("broker", "?")
        self.settings = Settings(**{
            "kafka_bootstrap": stack.kafka_bootstrap, "redis_url": stack.redis_url, "milvus_uri": stack.milvus_uri,
            "milvus_token": getattr(stack, "milvus_token", ""),
            "milvus_index_type": getattr(stack, "milvus_index_type", "FLAT"),
            "app_id": f"t-{run}", "key_prefix": f"t-{run}", "milvus_collection": f"t_{run}",
            "topic_events": f"t-{run}.events", "topic_catalog": f"t-{run}.catalog",
            "topic_requests": f"t-{run}.requests", "topic_recommendations": f"t-{run}.recs",
            "topic_deadletter": f"t-{run}.dlq", "kafka_rebalance_timeout_s": 3.0,
            # the shortest session Kafka allows by default: Tansu holds a new group for half of it
            "kafka_session_timeout_s": 6.0,
            "data_dir": str(tmp / "data"), **overrides})
        self.log = KafkaEventLog(stack.kafka_bootstrap)
        self.log.ensure_topics(all_topics(self.settings), self.settings.topic_partitions)
        self.redis = connect(self.settings.redis_url, asyncio=False)
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

    def profile(self, user: str, ok: Callable[[Profile, bool], bool] = lambda p, forgotten: True,
                timeout_s: float = 60) -> tuple[Profile, bool]:
        """The stored (profile, forgotten) of ``user`` once ``ok`` holds for it: a batch's lists go
        out before its profiles are written, so a test that has its lists waits for those too."""
        from streams.stores import codec

        key = f"{self.prefix}:{{u:{user}}}"
        got: list = []

        def ready() -> bool:
            raw = self.redis.get(key)
            if raw is None:
                return False
            got[:] = [codec.decode(user, raw)]
            return ok(*got[0])

        wait_for(ready, f"the stored profile of {user}", timeout_s, self.worker.proc, self.worker.log_path)
        return got[0]

    def stats(self) -> dict[str, int]:
        return read_stats(self.redis, self.prefix, self.settings.state_shards)

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
