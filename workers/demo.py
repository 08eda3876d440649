"""``streamrec demo``: the whole path on the embedded stack, summarised in one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from streams.stores.redis_profiles import read_stats
from workers import demo_data
from workers.cpu import meter
from workers.runner import encode_line, read_outputs, stack_processes, wait_stat, worker_on_stack
from workers.settings import Settings
from workers.stack import Stack

#: Malformed messages the demo mixes into its stream, to show the dead-letter path.
BAD_MESSAGES = [b"{not json", b'{"type": "click", "user_id": "demo-user-000"}',
                b'{"type": "click", "event_id": "bad-3", "user_id": "demo-user-000", "item_id": "no-such-item", "timestamp": 1}']


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


def run_demo(settings: Settings, users: int = 60, events_per_user: int = 12, items: int = 400,
             rate: float = 100.0, data_dir: Optional[str] = None) -> dict:
    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
    catalog = demo_data.build_catalog(items)
    events, sim_users = demo_data.simulate_events(catalog, n_users=users, events_per_user=events_per_user)
    latent = {u.user_id: set(u.categories) for u in sim_users}
    category = {it["item_id"]: it["category"] for it in catalog}
    _say(f"starting the embedded stack in {base}")
    with Stack(base) as stack:
        with worker_on_stack(settings, stack, base, "demo") as (s, log, worker, r):
            t0 = time.time()
            _say(f"publishing {len(catalog)} catalog items")
            log.publish(s.topic_catalog, [(*encode_line(it), None) for it in catalog])
            wait_stat(r, s.key_prefix, "items_upserted", len(catalog), 300, worker)
            _say(f"catalog indexed in {time.time() - t0:.1f} s; streaming {len(events)} events "
                 f"from {users} users at {rate or 'max'} events/s")
            p = log.producer()
            cpu = meter(stack_processes(stack, worker), "demo")
            bad_at = {len(events) * (n + 1) // (len(BAD_MESSAGES) + 1): bad for n, bad in enumerate(BAD_MESSAGES)}
            start = time.time()
            for i, ev in enumerate(events):
                if rate:
                    ahead = start + i / rate - time.time()
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the simulated users' stream
                ev = {**ev, "timestamp": time.time()}
                key, value = encode_line(ev)
                p.send(s.topic_events, key=key, value=value)
                if i in bad_at:
                    p.send(s.topic_events, key=key, value=bad_at[i])
            p.flush()
            sent_at = time.time()
            got = read_outputs(log, s.topic_recommendations, [e["event_id"] for e in events], 300, worker)
            done_at = max(m["produced_time"] for ms in got.values() for m in ms)
            cpu_ms = cpu(len(events))
            wait_stat(r, s.key_prefix, "dead_letters", len(BAD_MESSAGES), 60, worker)
            wait_stat(r, s.key_prefix, "events_applied", len(events), 60, worker)
            stats = read_stats(r, s.key_prefix, s.state_shards)
            n_items = _count_items(s)
        hits = total = 0
        first_event = {}
        for ev in events:
            first_event.setdefault(ev["user_id"], ev["event_id"])
        latencies = []
        for ev in events:
            msg = got[ev["event_id"]][0]
            latencies.append((msg["produced_time"] - msg["event_time"]) * 1000)
            if ev["event_id"] == first_event[ev["user_id"]]:
                continue  # the list after a user's first event is barely personalised yet
            for item in msg["items"]:
                total += 1
                hits += category[item["item_id"]] in latent[ev["user_id"]]
        return {
            "events_in": len(events) + len(BAD_MESSAGES),
            "events_applied": stats.get("events_applied", 0),
            "recommendations_out": sum(len(v) for v in got.values()),
            "dead_letters": stats.get("dead_letters", 0),
            "users": len(latent),
            "items": n_items,
            "interest_hit_rate": round(hits / max(total, 1), 3),
            "chance_rate": round(demo_data.chance_rate(catalog, sim_users), 3),
            "throughput_eps": round(len(events) / max(done_at - start, 1e-9), 1),
            "offered_rate_eps": rate or None,
            "latency_ms": percentiles(latencies),
            "send_s": round(sent_at - start, 2),
            "cpu_ms_per_event": cpu_ms,  # each process's CPU over the stream (workers.cpu)
            "versions": {"broker": stack.versions.get("broker"), "redis": stack.versions.get("redis"),
                         "milvus": stack.versions.get("milvus"), "encoder": _encoder_version(s)},
        }


def _count_items(s: Settings) -> int:
    from streams.stores.milvus_items import milvus_client

    c = milvus_client(s.milvus_uri, s.milvus_token.get_secret_value())
    try:
        return int(c.query(s.milvus_collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
    finally:
        c.close()


def _encoder_version(s: Settings) -> str:
    from models.encoder import default_model_path

    path = s.encoder_model or default_model_path()
    cfg = json.loads((Path(path) / "config.json").read_text())
    return f"{Path(path).parent.name if Path(path).name == 'model' else Path(path).name} ({cfg.get('model_type')}, {cfg.get('hidden_size')}-dim)"
