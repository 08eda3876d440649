"""The console script as a user runs it: ``up``, ``load``, ``schemas``, ``demo`` and ``bench``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from streams.stores.eventlog import KafkaEventLog
from workers.stack import port_open

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

CLI = [sys.executable, "-m", "workers.cli"]


def test_up_starts_the_stack_prints_addresses_and_stops_it(tmp_path):
    proc = subprocess.Popen(CLI + ["up", "--data-dir", str(tmp_path), "--kafka-port", "0", "--redis-port", "0",
                                   "--milvus-port", "0"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        info = json.loads(proc.stdout.readline())  # printed once every service answers
        exports = [proc.stdout.readline().strip() for _ in range(3)]
        ports = [int(info["kafka"].rsplit(":", 1)[1]), int(info["redis"].rsplit(":", 1)[1].split("/")[0]),
                 int(info["milvus"].rsplit(":", 1)[1])]
        assert all(port_open(p) for p in ports)
        assert set(info["versions"]) == {"broker", "redis", "milvus"}
        assert exports[0].startswith("export STREAMREC_KAFKA_BOOTSTRAP=")
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert len(children) == 3
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    for pid in children:  # every child process is gone
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def _env(stack, run: str) -> dict:
    return {**os.environ, **stack.env(), "STREAMREC_TOPIC_EVENTS": f"{run}.events",
            "STREAMREC_TOPIC_CATALOG": f"{run}.catalog", "STREAMREC_TOPIC_REQUESTS": f"{run}.requests",
            "STREAMREC_TOPIC_RECOMMENDATIONS": f"{run}.recs", "STREAMREC_TOPIC_DEADLETTER": f"{run}.dlq"}


def test_load_validates_every_line_and_publishes_to_the_right_topics(stack, tmp_path):
    run = f"load-{uuid.uuid4().hex[:8]}"
    good = [{"type": "item", "item_id": "i1", "title": "A", "timestamp": 1.0},
            {"type": "click", "event_id": "e1", "user_id": "u1", "item_id": "i1"},
            {"type": "query", "event_id": "e2", "user_id": "u1", "text": "hello"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(g) for g in good) + '\n{"type": "click", "user_id": 3}\nnot json\n')
    bad = subprocess.run(CLI + ["load", str(path), "--stamp-now"], env=_env(stack, run), capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert f"{path}:4:" in bad.stderr and "click needs field 'event_id'" in bad.stderr
    assert f"{path}:5: not JSON" in bad.stderr and "nothing sent" in bad.stderr
    ok = subprocess.run(CLI + ["load", str(path), "--stamp-now", "--skip-invalid"], env=_env(stack, run),
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary == {"sent": 3, "invalid": 2, "topics": {f"{run}.catalog": 1, f"{run}.events": 2}}
    log = KafkaEventLog(stack.kafka_bootstrap)
    events = log.read(f"{run}.events", until=lambda r: len(r) >= 2, timeout_s=30)
    log.close()
    assert sorted(r.key for r in events) == [b"u1", b"u1"]
    assert all("timestamp" in json.loads(r.value) for r in events)


def test_schemas_prints_and_exports_every_record(tmp_path):
    from schemas import RECORDS

    out = subprocess.run(CLI + ["schemas"], capture_output=True, text=True, check=True)
    printed = json.loads(out.stdout)
    assert set(printed) == {cls._options.namespace for cls in RECORDS}
    subprocess.run(CLI + ["schemas", "--out", str(tmp_path)], capture_output=True, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{ns}.schema.json" for ns in printed)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_counts_balance(tmp_path):
    from workers.demo import BAD_MESSAGES, run_demo
    from workers.settings import Settings

    s = run_demo(Settings(), users=8, events_per_user=5, items=80, rate=0, data_dir=str(tmp_path))
    assert s["events_in"] == 40 + len(BAD_MESSAGES)
    assert s["events_applied"] == s["recommendations_out"] == 40
    assert s["dead_letters"] == len(BAD_MESSAGES) and s["users"] == 8 and s["items"] == 80
    assert s["interest_hit_rate"] > s["chance_rate"]
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert all(s["versions"].values())
    cpu = s["cpu_ms_per_event"]  # where the stack's CPU went, by process
    assert {"worker", "broker", "redis", "milvus", "demo"} <= set(cpu) and cpu["worker"] > 0 and cpu["cores_busy"] > 0


@pytest.mark.slow
def test_bench_reports_streams_and_limits(tmp_path):
    from workers.bench import run_bench
    from workers.settings import Settings

    r = run_bench(Settings(), events=40, items=80, users=8, data_dir=str(tmp_path), memory_marks=(5, 20))
    assert r["click_stream"]["events"] == 40 and r["query_stream"]["events"] > 0
    for part in ("encoder_texts_per_s", "milvus_searches_per_s", "redis_profile_updates_per_s"):
        assert r["limits"][part] > 0
    assert set(r["ratios"]) and all(v > 0 for v in r["ratios"].values())
    mem = r["redis_bytes_per_user"]
    assert set(mem) == {"5", "20"} and 0 < mem["5"] <= mem["20"]
    assert r["isolated_event"]["events"] > 0 and r["isolated_event"]["latency_ms"]["p50"] > 0
    assert set(r["limits"]["encoder_texts_per_s_by_backend"]) == {"torch", "onnx", "onnx-int8"}
    import torch

    assert r["limits"]["encoder_backend"] == ("torch" if torch.cuda.is_available() else "onnx")  # auto
    for stream in ("click_stream", "query_stream"):
        st = r["stages"][stream]
        assert st["events"] >= r[stream]["events"]  # the worker counted every event of the stream
        assert st["process"] > 0 and st["publish"] > 0 and st["redis"] > 0 and st["parse"] > 0
        assert st["process"] >= st["parse"] + st["ranking"]
        assert st["other"] >= 0 and st["overlapped"] >= 0 and min(st["other"], st["overlapped"]) == 0
    assert r["stages"]["query_stream"]["encoder"] > 0 and r["stages"]["click_stream"]["milvus"] > 0
    for stream in ("click_stream", "query_stream", "paced_click_stream"):  # CPU of every process over each stream
        cpu = r["cpu_ms_per_event"][stream]
        assert {"worker", "broker", "redis", "milvus", "bench"} <= set(cpu) and cpu["worker"] > 0
        parts = sum(v for name, v in cpu.items() if name not in ("total", "cores_busy", "events_per_s_all_cores"))
        assert cpu["total"] == pytest.approx(parts, abs=0.01) and cpu["cores_busy"] > 0
    assert r["cpu_ms_per_event"]["query_stream"]["worker"] > r["cpu_ms_per_event"]["click_stream"]["worker"]  # encoding
