"""Integration by events with a client that is not ours: kcat (librdkafka) publishes the catalog
and events to the stack that ``streamrec up`` starts (Apache Kafka, since Java 17 runs here), and
reads the lists and the dead letters back, also after ``streamrec up`` is started again on the
same data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from streams.stores.redis_profiles import connect
from tests.integration.conftest import CATALOG, items_of
from workers.kafka_broker import ApacheKafka, KafkaUnavailable
from workers.runner import WorkerProcess, wait_stat
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

CLI = [sys.executable, "-m", "workers.cli"]


def kcat_produce(kcat: str, bootstrap: str, topic: str, records: list[tuple[str, dict | str]]) -> None:
    """``key<TAB>value`` lines into ``kcat -P``."""
    lines = "".join(f"{k}\t{v if isinstance(v, str) else json.dumps(v)}\n" for k, v in records)
    subprocess.run([kcat, "-P", "-b", bootstrap, "-t", topic, "-K", "\t"], input=lines, text=True, check=True,
                   timeout=60)


def kcat_consume(kcat: str, bootstrap: str, topic: str) -> list[tuple[str, str]]:
    """Every message on ``topic`` so far, as (key, value), read by ``kcat -C -e``."""
    out = subprocess.run([kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q",
                          "-f", "%k\t%s\n"], capture_output=True, text=True, timeout=60, check=True).stdout
    return [tuple(line.split("\t", 1)) for line in out.splitlines() if "\t" in line]


def test_kcat_publishes_and_reads_back_on_streamrec_up_with_apache_kafka(tmp_path):
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("no `kcat` on PATH (Debian's package `kcat`; .ci/run installs it)")
    try:
        ApacheKafka(tmp_path).check()
    except KafkaUnavailable as exc:
        pytest.skip(f"Apache Kafka not available: {exc}")
    def streamrec_up() -> tuple[subprocess.Popen, dict]:
        proc = subprocess.Popen(CLI + ["up", "--data-dir", str(tmp_path / "stack"),  # the default broker: auto
                                       "--kafka-port", "0", "--redis-port", "0", "--milvus-port", "0"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = proc.stdout.readline()  # printed once every service answers
        if not line:
            proc.kill()
            raise AssertionError(f"streamrec up exited {proc.wait(60)} before its services answered")
        return proc, json.loads(line)

    def stop(proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(90) == 0

    up, info = streamrec_up()
    worker = None
    try:
        assert info["versions"]["broker"].startswith("apache-kafka ")
        run = f"kcat-{uuid.uuid4().hex[:8]}"
        s = Settings(kafka_bootstrap=info["kafka"], redis_url=info["redis"], milvus_uri=info["milvus"],
                     app_id=run, key_prefix=run, milvus_collection=run.replace("-", "_"),
                     topic_events=f"{run}.events", topic_catalog=f"{run}.catalog", topic_requests=f"{run}.requests",
                     topic_recommendations=f"{run}.recs", topic_deadletter=f"{run}.dlq",
                     kafka_session_timeout_s=6.0, kafka_rebalance_timeout_s=3.0, data_dir=str(tmp_path / "data"))
        worker = WorkerProcess(s, tmp_path / "worker.log").start()
        r = connect(s.redis_url, asyncio=False)
        kcat_produce(kcat, s.kafka_bootstrap, s.topic_catalog, [(it["item_id"], it) for it in CATALOG])
        wait_stat(r, s.key_prefix, "items_upserted", len(CATALOG), 180, worker)
        now = time.time()
        events = [{"type": "click", "event_id": f"k{n}", "user_id": f"kc{n % 2}", "item_id": item, "timestamp": now}
                  for n, item in enumerate(items_of("cooking")[:6])]
        kcat_produce(kcat, s.kafka_bootstrap, s.topic_events,
                     [(e["user_id"], e) for e in events] + [("kc9", "{not json")])
        wait_stat(r, s.key_prefix, "dead_letters", 1, 120, worker)
        wait_stat(r, s.key_prefix, "events_applied", len(events), 120, worker)
        lists = {json.loads(v)["trigger_event_id"]: json.loads(v) for _, v in kcat_consume(kcat, s.kafka_bootstrap,
                                                                                        s.topic_recommendations)}
        assert set(lists) == {e["event_id"] for e in events}
        assert all(len(m["items"]) == 10 and m["user_id"] in ("kc0", "kc1") for m in lists.values())
        (dead,) = kcat_consume(kcat, s.kafka_bootstrap, s.topic_deadletter)
        assert dead[0] == "kc9" and json.loads(dead[1])["error"] == "bad_json"
        r.close()
        # stopped and started again on the same data (as a user does with the default data
        # folder), the broker comes back with its topics: the lists are still there to read
        worker.stop()
        worker = None
        stop(up)
        up, info = streamrec_up()
        again = {json.loads(v)["trigger_event_id"]: json.loads(v)
                 for _, v in kcat_consume(kcat, info["kafka"], s.topic_recommendations)}
        assert again == lists
    finally:
        if worker is not None:
            worker.stop()
        stop(up)
