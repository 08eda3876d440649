"""``streamrec eval`` through the real pipeline on a small JSONL data set: every event answered and
scored, every system reported with every metric, the files written, the sanity bounds held."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid

import pytest

from models.evaluation import SEGMENT_NAMES, SEGMENTS
from workers import demo_data
from workers.datasets import load_dataset
from workers.evaluate import METRICS, SYSTEMS, EvalOptions, run_eval
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


def write_dataset(path, n_items=96, users=16, per_user=14):
    catalog = demo_data.build_catalog(n_items)
    events, _ = demo_data.simulate_events(catalog, n_users=users, events_per_user=per_user, seed=11)
    for n, e in enumerate(events):
        e["timestamp"] = 1_750_000_000.0 + 60.0 * n
    events.append({"type": "click", "event_id": "bad-item", "user_id": "demo-user-000", "item_id": "nope",
                   "timestamp": 1_760_000_000.0})
    path.mkdir()
    (path / "catalog.jsonl").write_text("".join(json.dumps(c) + "\n" for c in catalog))
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return catalog, events


def test_eval_scores_every_system_through_the_pipeline(stack, tmp_path):
    catalog, events = write_dataset(tmp_path / "data")
    settings = fresh_settings()
    ds = load_dataset(tmp_path / "data", "jsonl")
    out = tmp_path / "out"
    r = run_eval(settings, ds, out, EvalOptions(k=5, in_flight=64, als_every=50), data_dir=str(tmp_path / "w"),
                 stack=stack)

    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == r
    assert r["dataset"] == "jsonl:data" and r["k"] == 5 and r["events"] == len(events)
    assert r["events_answered"] == len(events) - 1 and r["dead_lettered"] == 1
    assert r["dead_letter_reasons"] == {"unknown_item": 1}
    assert set(r["systems"]) == set(SYSTEMS)
    # every click of a user after their first event is scored, the same ones for every system
    scored, users = 0, set()
    for e in events[:-1]:
        scored += e["type"] == "click" and e["user_id"] in users
        users.add(e["user_id"])
    for name, m in r["systems"].items():
        assert set(METRICS) <= set(m), name
        assert m["events_scored"] == scored, name
        assert 0.0 <= m["hr"] <= 1.0 and 0.0 <= m["ndcg"] <= m["hr"] and 0.0 <= m["mrr"] <= m["hr"]
        assert 0.0 < m["coverage"] <= 1.0
        assert set(m["segments"]) == set(SEGMENT_NAMES)
        assert all(set(METRICS) <= set(seg) for seg in m["segments"].values())
        # the history segments do not overlap; cold items cut across them
        assert sum(m["segments"][n]["events_scored"] for n, _, _ in SEGMENTS) <= m["events_scored"]
        assert m["segments"]["cold_items"]["events_scored"] <= m["events_scored"]
    assert scored > 100
    # the demo users have strong category tastes: the pipeline beats chance by far
    assert r["systems"]["streamrec"]["hr"] > 3 * r["systems"]["random"]["hr"]
    assert r["latency_ms"]["p50"] > 0 and r["throughput_eps"] > 0
    # the worker's stage timings cover every event of the stream
    st = r["stages_ms_per_event"]
    assert st["events"] == len(events) and st["milvus"] > 0 and st["ranking"] > 0 and st["batch"] >= st["process"]
    cpu = r["cpu_ms_per_event"]  # every process's CPU over the stream
    assert {"worker", "broker", "redis", "milvus", "eval"} <= set(cpu) and cpu["worker"] > 0 and cpu["total"] > cpu["worker"]
    assert cpu["events_per_s_all_cores"] > 0
    report = (out / "report.md").read_text()
    assert "the worker's stages, ms per event" in report and "CPU per event over the stream" in report
    assert all(f"| {name} |" in report for name in SYSTEMS) and "hr_over_stream.png" in report
    for png in ("hr_over_stream.png", "latency_histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "/nonexistent/data", "--out", "x"], "cannot load"),
    (["--dataset", ".", "--out", "x", "--k", "0"], "must be positive"),
    (["--dataset", ".", "--out", "x", "--peers", "random,magic"], "unknown peer"),
])
def test_eval_rejects_bad_arguments_clearly(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "workers.cli", "eval", *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and message in res.stderr


def fresh_settings() -> Settings:
    run = uuid.uuid4().hex[:10]
    return Settings(topic_events=f"ev-{run}.events", topic_catalog=f"ev-{run}.catalog",
                    topic_requests=f"ev-{run}.requests", topic_recommendations=f"ev-{run}.recs",
                    topic_deadletter=f"ev-{run}.dlq", milvus_collection=f"ev_{run}")


def test_lists_never_see_the_future(stack, tmp_path):
    """One event in flight at a time, so batching is the same in both runs: the lists for the first
    40 events are the same whether or not 20 more events follow them (popularity and co-clicks
    on, as by default)."""
    write_dataset(tmp_path / "data", n_items=48, users=8, per_user=12)
    lists = []
    for n in (40, 60):
        ds = load_dataset(tmp_path / "data", "jsonl", limit_events=n)
        out = tmp_path / f"out{n}"
        run_eval(fresh_settings(), ds, out, EvalOptions(k=5, in_flight=1, peers=("random",)),
                 data_dir=str(tmp_path / f"w{n}"), stack=stack)
        with gzip.open(out / "lists.jsonl.gz", "rt") as fh:
            lists.append([json.loads(line) for line in fh])
    assert len(lists[0]) == 40 and len(lists[1]) == 60
    assert lists[1][:40] == lists[0] and all(r["items"] for r in lists[0])
