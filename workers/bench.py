"""``streamrec bench``: events/s and latency through the embedded stack, beside the limits of its
parts measured in the same run (encoder texts/s, Milvus batched searches/s, Redis profile
updates/s). Ratios, not absolute targets: these machines are noisy."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


from workers import demo_data
from workers.cpu import meter
from workers.demo import percentiles
from workers.runner import (WorkerProcess, encode_line, metrics_scraper, read_outputs, stack_processes, stages_per_event,
                            wait_stat, worker_on_stack)
from workers.settings import Settings
from workers.stack import Stack, free_port


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _stream(log, s: Settings, events: list[dict], worker: WorkerProcess, rate: float = 0.0) -> dict:
    """Send ``events`` (all at once, or paced at ``rate`` events/s) and measure the answers."""
    p = log.producer()
    start = time.time()
    for i, ev in enumerate(events):
        if rate:
            ahead = start + i / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)  # pacing the offered load
        key, value = encode_line({**ev, "timestamp": time.time()})
        p.send(s.topic_events, key=key, value=value)
    p.flush()
    got = read_outputs(log, s.topic_recommendations, [e["event_id"] for e in events], 600, worker)
    msgs = [got[e["event_id"]][0] for e in events]
    done = max(m["produced_time"] for m in msgs)
    lat = [(m["produced_time"] - m["event_time"]) * 1000 for m in msgs]
    return {"events": len(events), "sent": f"paced at {rate:.0f} events/s" if rate else
            "all at once (latency includes queueing)",
            "events_per_s": round(len(events) / (done - start), 1),
            "latency_ms": percentiles(lat)}


def run_bench(settings: Settings, events: int = 2000, items: int = 2000, users: int = 200,
              data_dir: Optional[str] = None, memory_marks: tuple[int, ...] = (100, 1000)) -> dict:
    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    catalog = demo_data.build_catalog(items)
    per_user = max(1, events // users)
    evs, _ = demo_data.simulate_events(catalog, n_users=users, events_per_user=per_user, query_share=0.0, seed=3)
    qevs, _ = demo_data.simulate_events(catalog, n_users=users, events_per_user=per_user + 1, query_share=1.0, seed=4)
    qevs = [e for e in qevs if e["type"] == "query"]
    for n, e in enumerate(qevs):
        e["event_id"] = f"q-{n:06d}"
    settings = settings.model_copy(update={"metrics_port": settings.metrics_port or free_port()})
    with Stack(base) as stack, worker_on_stack(settings, stack, base, "bench") as (s, log, worker, r):
        _say(f"indexing {len(catalog)} items")
        t0 = time.time()
        log.publish(s.topic_catalog, [(*encode_line(it), None) for it in catalog])
        wait_stat(r, s.key_prefix, "items_upserted", len(catalog), 600, worker)
        _say(f"catalog ready after {time.time() - t0:.1f} s (worker start included)")
        scrape = metrics_scraper(s)
        parts = stack_processes(stack, worker)

        def measured(events: list[dict], rate: float = 0.0) -> dict:
            """One stream, with the worker's stage timings and every process's CPU over it."""
            before, cpu = scrape(), meter(parts, "bench")
            got = _stream(log, s, events, worker, rate)
            got["cpu_ms_per_event"] = cpu(len(events))
            got["stages_ms_per_event"] = stages_per_event(before, scrape(after=before, events=len(events)))
            return got

        _say("one event at a time, on an idle worker")
        isolated = _isolated(log, s, worker, evs[-20:])
        _say(f"click-only stream: {len(evs)} events from {users} users")
        clicks = measured(evs)
        _say(f"query-only stream: {len(qevs)} events")
        queries = measured(qevs)
        paced_rate = round(clicks["events_per_s"] / 2)
        _say(f"click stream paced at half that throughput ({paced_rate} events/s)")
        repeat = [{**e, "event_id": "p-" + e["event_id"]} for e in evs[: max(1, len(evs) // 4)]]
        paced = measured(repeat, rate=paced_rate)
        _say(f"memory per user: {max(memory_marks):,} clicks by each of 2 users, in one scene")
        memory = _bytes_per_user(log, s, worker, r, catalog, marks=memory_marks)
        worker.stop()
        _say("measuring the parts alone")
        limits = asyncio.run(_limits(s, catalog))
    out = {
        "stack": stack.versions,
        "items": len(catalog),
        "click_stream": clicks,
        "query_stream": queries,
        "paced_click_stream": paced,
        "isolated_event": isolated,
        "stages": {"click_stream": clicks.pop("stages_ms_per_event"),
                   "query_stream": queries.pop("stages_ms_per_event"),
                   "paced_click_stream": paced.pop("stages_ms_per_event")},
        # CPU of each process over each stream: the worker, the servers and this process (the sender)
        "cpu_ms_per_event": {"click_stream": clicks.pop("cpu_ms_per_event"),
                             "query_stream": queries.pop("cpu_ms_per_event"),
                             "paced_click_stream": paced.pop("cpu_ms_per_event")},
        "limits": limits,
        "redis_bytes_per_user": memory,
        "ratios": {
            "click_eps_over_milvus_queries_per_s": round(clicks["events_per_s"] / limits["milvus_searches_per_s"], 3),
            "click_eps_over_redis_updates_per_s": round(clicks["events_per_s"] / limits["redis_profile_updates_per_s"], 3),
            "query_eps_over_encoder_texts_per_s": round(queries["events_per_s"] / limits["encoder_texts_per_s"], 3),
            "query_eps_over_milvus_queries_per_s": round(queries["events_per_s"] / limits["milvus_searches_per_s"], 3),
            "click_eps_over_min_limit": round(clicks["events_per_s"] / min(limits["milvus_searches_per_s"],
                                                                           limits["redis_profile_updates_per_s"]), 3),
            "paced_p99_over_isolated_p50": round(paced["latency_ms"]["p99"] / isolated["latency_ms"]["p50"], 2),
        },
        "batch": {"encoder_batch_size": s.encoder_batch_size, "search_batch": 64, "batch_max": s.batch_max},
    }
    return out


def _isolated(log, s: Settings, worker: WorkerProcess, events: list[dict]) -> dict:
    """Latency of single events, each sent after the previous one's list is out (an idle worker)."""
    lat = []
    for n, ev in enumerate(events):
        one = {**ev, "event_id": f"iso-{n}-{ev['event_id']}"}
        lat.append(_stream(log, s, [one], worker)["latency_ms"]["p50"])
    return {"events": len(events), "sent": "one at a time, each after the previous list",
            "latency_ms": percentiles(lat)}


def _bytes_per_user(log, s: Settings, worker: WorkerProcess, r, catalog: list[dict], users: int = 2,
                    marks: tuple[int, ...] = (100, 1000)) -> dict[str, int]:
    """Clicks through the worker by a few users, in one scene; at each mark of clicks per user,
    the sum of ``MEMORY USAGE`` over every key of a user (the largest of the users)."""
    import random

    from streams.stores.redis_profiles import read_stats

    rng = random.Random(5)
    out: dict[str, int] = {}
    done = 0
    for mark in marks:
        base = read_stats(r, s.key_prefix, s.state_shards)["events_applied"]
        evs = [{"type": "click", "event_id": f"mem-{u}-{n}", "user_id": f"mem-{u}", "scene": "home",
                "item_id": rng.choice(catalog)["item_id"]} for n in range(done, mark) for u in range(users)]
        p = log.producer()
        for ev in evs:
            key, value = encode_line({**ev, "timestamp": time.time()})
            p.send(s.topic_events, key=key, value=value)
        p.flush()
        wait_stat(r, s.key_prefix, "events_applied", base + len(evs), 600, worker)
        sizes = []
        for u in range(users):
            keys = list(r.scan_iter(match=f"{s.key_prefix}:{{u:mem-{u}}}*", count=1000))
            sizes.append(sum(int(r.memory_usage(k, samples=0) or 0) for k in keys))
        out[str(mark)] = max(sizes)
        done = mark
    return out


async def _limits(s: Settings, catalog: list[dict]) -> dict:
    from models.profile import Profile, apply_click
    from streams.pipeline import search_limit
    from streams.stores import Write, open_item_index, open_profile_store

    texts = [q for c in demo_data.CATEGORIES for q in demo_data.query_texts(c)] * 16
    used = s.open_encoder()
    backends = {}  # texts/s of each backend, side by side
    for backend in ("torch", "onnx", "onnx-int8"):
        enc = used if backend == used.backend else s.model_copy(update={"encoder_backend": backend}).open_encoder()
        enc.encode(texts[:16])
        t = time.perf_counter()
        vecs = enc.encode(texts)
        backends[backend] = round(len(texts) / (time.perf_counter() - t), 1)
        del enc
    encoder_tps = backends[used.backend]
    vecs = used.encode(texts)
    enc = used

    index = open_item_index(s.milvus_uri, enc.dim, s.milvus_collection, s.milvus_token.get_secret_value(),
                            s.milvus_consistency, s.milvus_index_type, s.milvus_flush_writes)
    batches = [vecs[i:i + 64] for i in range(0, 512, 64)]
    _, limit = search_limit(s.k, s.model.oversample)  # the hits the worker's first search asks of each list
    index.search(batches[0], limit)
    t = time.perf_counter()
    for b in batches:
        index.search(b, limit)
    milvus_qps = sum(len(b) for b in batches) / (time.perf_counter() - t)
    index.close()

    store = open_profile_store(s.redis_url, f"{s.key_prefix}-limit", s.store_options())
    n = 2000
    profiles = [Profile(user_id=f"u{i}") for i in range(n)]
    for p in profiles:
        apply_click(p, "i0", 0, vecs[0], "t", "c", "home", 1.0, 0.0, s.model)
    t = time.perf_counter()
    for start in range(0, n, 32):  # 32 profiles per round trip, as the worker writes a batch's users
        await store.commit([Write(p, p.version) for p in profiles[start:start + 32]])
    redis_ups = n / (time.perf_counter() - t)
    await store.close()
    return {"encoder_texts_per_s": round(encoder_tps, 1), "encoder_backend": used.backend,
            "encoder_texts_per_s_by_backend": backends, "milvus_searches_per_s": round(milvus_qps, 1),
            "redis_profile_updates_per_s": round(redis_ups, 1), "encoder_threads": int(_threads()),
            "milvus_search_limit": limit}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


