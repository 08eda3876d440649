"""``streamrec eval``: a data set through the real pipeline (Kafka, the worker, Redis, Milvus, the
output topic), scored test-then-train beside the peers a user would pick instead.

The catalog is published and indexed first; then the events, in data set order, keyed by user,
with at most ``in_flight`` of them unanswered at any time (a closed loop: throughput is what the
worker sustains, and latency is not the age of a backlog). Every recommendations message is
joined to the event that triggered it by ``trigger_event_id``, so scores do not depend on timing.
The peers then see exactly the same events in the same order.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from models.evaluation import COLD_CLICKS, COLD_ITEMS, SEGMENT_NAMES, StreamResult, evaluate_stream, windowed_hit_rate
from streams.stores.redis_profiles import read_stats
from workers.cpu import cores, meter
from workers.datasets import Dataset
from workers.demo import percentiles
from workers.runner import (WorkerProcess, encode_line, metrics_scraper, stack_processes, stages_per_event,
                            worker_on_stack)
from workers.settings import Settings
from workers.stack import Stack, free_port

SYSTEMS = ("streamrec", "random", "popularity", "recent_popularity", "item_knn", "sequential_rules", "session_knn",
           "river_mf", "implicit_als", "ease")
METRICS = ("hr", "ndcg", "mrr", "coverage", "events_scored")


def _say(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


@dataclass
class EvalOptions:
    k: int = 10
    in_flight: int = 256  # events sent and not yet answered, at most
    halflife_s: float = 7 * 86_400.0  # popularity's half-life in event time (streamrec and recent_popularity)
    als_every: int = 5_000  # implicit_als retrains every this many clicks
    seed: int = 0
    peers: tuple[str, ...] = SYSTEMS[1:]
    timeout_s: float = 3_600.0  # longest wait for the worker to answer everything
    ablate: tuple[str, ...] = ()  # signals to switch off one at a time (models.learning.SIGNALS)


@dataclass
class _Answers:
    """What the output and dead-letter topics said, by trigger event id (filled by a reader thread)."""

    lists: dict[str, list[str]] = field(default_factory=dict)
    produced: dict[str, float] = field(default_factory=dict)
    dead: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = None  # type: ignore[assignment]
    error: Optional[BaseException] = None

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


def _read_answers(log, s: Settings, answers: _Answers, stop: threading.Event, timeout_s: float) -> None:
    """Tail the recommendations and dead-letter topics into ``answers`` until ``stop``."""
    try:
        for batch in log.tail([s.topic_recommendations, s.topic_deadletter], timeout_s=timeout_s):
            if stop.is_set():
                return
            if not batch:
                continue
            with answers.lock:
                for r in batch:
                    msg = json.loads(r.value)
                    if r.topic == s.topic_deadletter:
                        eid = _event_id(msg.get("value_b64", ""))
                        if eid is not None and eid not in answers.dead and eid not in answers.lists:
                            answers.dead[eid] = f"{msg.get('error')}: {msg.get('reason')}"
                            answers.done += 1
                        continue
                    eid = msg["trigger_event_id"]
                    if msg.get("duplicate") or eid in answers.lists:
                        answers.duplicates += 1
                        continue
                    answers.lists[eid] = [it["item_id"] for it in msg["items"]]
                    answers.produced[eid] = float(msg["produced_time"])
                    answers.done += 1
                answers.changed.notify_all()
    except BaseException as exc:  # surfaced to the sender, which would otherwise wait forever
        with answers.lock:
            answers.error = exc
            answers.changed.notify_all()


def _event_id(value_b64: str) -> Optional[str]:
    try:
        obj = json.loads(base64.b64decode(value_b64))
        return str(obj["event_id"]) if isinstance(obj, dict) and "event_id" in obj else None
    except (ValueError, TypeError):
        return None


def _stream_events(log, s: Settings, events: list[dict], answers: _Answers, worker: WorkerProcess,
                   opts: EvalOptions) -> dict[str, float]:
    """Send ``events`` with at most ``opts.in_flight`` unanswered; returns send times by event id."""
    from tqdm import tqdm

    producer = log.producer()
    sent: dict[str, float] = {}
    deadline = time.monotonic() + opts.timeout_s
    bar = tqdm(total=len(events), unit="ev", desc="events answered", file=sys.stderr, mininterval=2.0)
    shown = 0

    def wait_until(target: int) -> None:
        nonlocal shown
        with answers.lock:
            while answers.done < target:
                if answers.error is not None:
                    raise RuntimeError(f"reading the output topic failed: {answers.error!r}")
                if not worker.alive():
                    raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{answers.done} of {len(events)} events answered after "
                                       f"{opts.timeout_s:.0f} s\nworker log:\n{worker.log_tail()}")
                answers.changed.wait(timeout=0.5)
            done = answers.done
        bar.update(done - shown)
        shown = done

    for n, e in enumerate(events):
        if n - answers.done >= opts.in_flight:
            producer.flush()
            wait_until(n - opts.in_flight + 1)
        key, value = encode_line(e)
        sent[e["event_id"]] = time.time()
        producer.send(s.topic_events, key=key, value=value)
    producer.flush()
    wait_until(len(events))
    bar.close()
    return sent


def make_peers(opts: EvalOptions, n_items: int) -> tuple[list, dict[str, str]]:
    """The peer systems, and the reason for each one left out."""
    from models import baselines as b

    makers = {
        "random": lambda: b.RandomBaseline(seed=opts.seed),
        "popularity": lambda: b.PopularityBaseline(),
        "recent_popularity": lambda: b.PopularityBaseline(halflife_s=opts.halflife_s),
        "item_knn": lambda: b.ItemKnnBaseline(),
        "sequential_rules": lambda: b.SequentialRulesBaseline(),
        "session_knn": lambda: b.SessionKnnBaseline(),
        "river_mf": lambda: b.RiverMFBaseline(seed=opts.seed),
        "implicit_als": lambda: b.ImplicitALSBaseline(retrain_every=opts.als_every, seed=opts.seed),
        "ease": lambda: b.EaseBaseline(),
    }
    dense = ("item_knn", "sequential_rules")  # a dense item x item matrix: refused above max_items
    peers, skipped = [], {}
    for name in opts.peers:
        if name not in makers:
            raise ValueError(f"unknown peer {name!r}; known: {', '.join(makers)}")
        peer = makers[name]()
        if name in dense and n_items > peer.max_items:
            skipped[name] = (f"its dense item-item matrix would need {n_items ** 2 * 4 / 2 ** 30:.1f} GiB for "
                             f"{n_items} items (limit {peer.max_items} items)")
            continue
        peers.append(peer)
    return peers, skipped


def run_eval(settings: Settings, dataset: Dataset, out: Path, opts: EvalOptions = EvalOptions(),
             data_dir: Optional[str] = None, stack: Optional[Stack] = None) -> dict:
    """Evaluate ``dataset``; writes ``out/eval.json``, ``out/report.md``, the plots and
    ``out/lists.jsonl.gz`` (streamrec's list after every event, null if dead-lettered); returns
    what ``eval.json`` holds. Starts the embedded stack unless ``stack`` is given (the settings'
    topic names are then used as they are: give fresh ones)."""
    out.mkdir(parents=True, exist_ok=True)
    base = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="streamrec-eval-"))
    started = time.time()
    events = dataset.events
    ids = [e.get("event_id") for e in events]
    if len(set(ids)) != len(ids) or None in ids:
        raise ValueError("every event needs a distinct event_id: lists are joined to events by it")
    # The worker's popularity decays with the same half-life (in event time) as recent_popularity's.
    # One partition: the worker sees the events in data set order, so no list can see a later
    # event (with several, popularity and co-clicks could include other users' events sent up to
    # ``in_flight`` later but consumed earlier from another partition).
    s0 = settings.model_copy(update={"k": opts.k, "popularity_halflife_s": opts.halflife_s, "topic_partitions": 1,
                                     "metrics_port": settings.metrics_port or free_port()})
    _say(f"{dataset.name}: {len(dataset.catalog)} items, {len(events)} events; "
         + ("on the given stack" if stack else f"starting the embedded stack in {base}"))
    with contextlib.ExitStack() as scope:
        if stack is None:
            stack = scope.enter_context(Stack(base))
        s, log, worker, r = scope.enter_context(worker_on_stack(s0, stack, base, "eval"))
        t0 = time.time()
        log.publish(s.topic_catalog, [(*encode_line(it), None) for it in dataset.catalog])
        _wait_catalog(r, s, len(dataset.catalog), worker)
        catalog_s = time.time() - t0
        st = read_stats(r, s.key_prefix, s.state_shards)
        indexed, catalog_dead = st["items_upserted"], st["dead_letters"]
        _say(f"catalog: {indexed} items indexed in {catalog_s:.1f} s ({catalog_dead} dead-lettered); "
             f"streaming {len(events)} events, at most {opts.in_flight} unanswered")
        scrape = metrics_scraper(s)  # the worker's stage timings over the stream
        before = scrape()
        answers = _Answers()
        stop = threading.Event()
        reader = threading.Thread(target=_read_answers, args=(log, s, answers, stop, opts.timeout_s + 600),
                                  daemon=True)
        reader.start()
        cpu = meter(stack_processes(stack, worker), "eval")
        try:
            first_sent = time.time()
            sent = _stream_events(log, s, events, answers, worker, opts)
        finally:
            stop.set()
            reader.join(timeout=30)
        cpu_ms = cpu(len(events))
        stats = read_stats(r, s.key_prefix, s.state_shards)
        stages = stages_per_event(before, scrape(after=before, events=len(events)))
        versions = {**stack.versions}
    answered = [e for e in events if e["event_id"] in answers.lists]
    lat = [(answers.produced[e["event_id"]] - sent[e["event_id"]]) * 1000 for e in answered]
    last_produced = max(answers.produced.values(), default=first_sent)
    stream_s = last_produced - first_sent
    _say(f"pipeline: {len(answered)} lists for {len(events)} events in {stream_s:.1f} s; scoring with "
         f"{', '.join(opts.peers)}")

    # Peers see the events the pipeline accepted, in the same order; catalog = what was indexed.
    valid = [e for e in events if e["event_id"] not in answers.dead]
    catalog_ids = [it["item_id"] for it in dataset.catalog if it.get("type", "item") == "item"
                   and it.get("available", True)]
    peers, skipped = make_peers(opts, len(catalog_ids))
    from tqdm import tqdm

    recorded = {"streamrec": answers.lists}
    ablation_s: dict[str, float] = {}
    if opts.ablate:
        recorded.update(run_ablations(s, dataset, valid, opts, ablation_s))
    with tqdm(total=len(valid), unit="ev", desc="scoring", file=sys.stderr, mininterval=2.0) as bar:
        res = evaluate_stream(valid, peers, opts.k, catalog_ids, recorded=recorded, progress=bar.update)
    result = {
        "dataset": dataset.name,
        "k": opts.k,
        "events": len(events),
        "events_answered": len(answered),
        "dead_lettered": len(answers.dead),
        "dead_letter_reasons": _top_reasons(answers.dead),
        "duplicates": answers.duplicates,
        "catalog_items": len(catalog_ids),
        "users": len({e["user_id"] for e in events}),
        "latency_ms": percentiles(lat),
        "latency_from": "event sent to the broker -> list produced by the worker",
        "throughput_eps": round(len(events) / max(stream_s, 1e-9), 1),
        "in_flight": opts.in_flight,
        "catalog_index_s": round(catalog_s, 1),
        "stages_ms_per_event": stages,
        "cpu_ms_per_event": cpu_ms,
        "systems": {name: _rounded(res[name]) for name in ("streamrec", *[p.name for p in peers])},
        "system_seconds": {name: round(v, 1) for name, v in res.seconds.items()},
        "skipped": skipped,
        "ablations": {name[len(ABLATION):]: {**_rounded(res[name]), "seconds": round(ablation_s[name], 1)}
                      for name in recorded if name.startswith(ABLATION)},
        "worker_stats": stats,
        "stack": versions,
        "machine": {"cpus": cores(), "python": platform.python_version()},
        "options": {"in_flight": opts.in_flight, "recent_popularity_halflife_s": opts.halflife_s,
                    "implicit_als_retrain_every": opts.als_every, "seed": opts.seed},
        "wall_s": None,
    }
    with gzip.open(out / "lists.jsonl.gz", "wt", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps({"event_id": e["event_id"], "user_id": e["user_id"],
                                 "items": answers.lists.get(e["event_id"])}) + "\n")
    plots = write_plots(out, res, lat, opts.k)
    result["wall_s"] = round(time.time() - started, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_report(result, plots))
    return result


ABLATION = "ablation:"


def _stage_line(st: Optional[dict]) -> list[str]:
    """The worker's stage timings as one report line (none when the run has none)."""
    if not st:
        return []
    names = ("parse", "redis", "milvus", "encoder", "ranking", "publish", "commit")
    return [f"- the worker's stages, ms per event (wall time of their calls; Redis reads overlap the "
            f"searches by {st['overlapped']}): " + ", ".join(f"{n} {st[n]}" for n in names)
            + f"; a batch {st['batch']} ({st['events_per_batch']} events a batch)"]


def _cpu_line(cpu: Optional[dict], n_cores: Optional[int]) -> list[str]:
    """CPU per event by process as one report line (none where it was not measured)."""
    if not cpu:
        return []
    named = [f"{name} {v}" for name, v in cpu.items() if name not in ("total", "cores_busy", "events_per_s_all_cores")]
    return ["- CPU per event over the stream, ms: " + ", ".join(named) + f"; in all {cpu['total']} "
            f"({cpu['cores_busy']} of {n_cores} cores busy; at this CPU per event, "
            f"{cpu['events_per_s_all_cores']} events/s would keep all {n_cores} busy)"]


def run_ablations(s: Settings, dataset: Dataset, events: list[dict], opts: EvalOptions,
                  seconds: dict[str, float], encoder=None) -> dict[str, dict[str, list[str]]]:
    """streamrec in one process (``workers.simulate``: the worker's pipeline over in-memory
    stores, the same encoder), once with every signal and once with each of ``opts.ablate`` off;
    the lists by event id of each run, named ``ablation:all`` and ``ablation:-<signal>``."""
    from dataclasses import replace

    from workers.simulate import CachedEncoder, simulate
    from workers.worker import limit_blas_threads

    encoder = CachedEncoder(encoder or s.open_encoder())
    out = {}
    for name in ("all", *opts.ablate):
        off = ",".join(x for x in (s.model.signals_off, "" if name == "all" else name) if x)
        params = replace(s.model, signals_off=off)
        label = ABLATION + ("all" if name == "all" else "-" + name)
        _say(f"ablation {label}: streamrec in one process, signals off: {off or 'none'}")
        t = time.perf_counter()
        with limit_blas_threads(s.blas_threads):  # as the worker runs
            out[label] = simulate(dataset.catalog, events, encoder, params, k=opts.k, batch=64,
                                  options=s.store_options()).lists
        seconds[label] = time.perf_counter() - t
    return out


def _wait_catalog(r, s: Settings, n: int, worker: WorkerProcess, timeout_s: float = 1800.0) -> None:
    """Until every catalog message is indexed, deleted or dead-lettered (a deadline, no fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        st = read_stats(r, s.key_prefix, s.state_shards)
        done = sum(st[name] for name in ("items_upserted", "items_deleted", "dead_letters"))
        if done >= n:
            return
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"catalog: {done} of {n} items handled after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _top_reasons(dead: dict[str, str], n: int = 5) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in dead.values():
        key = reason.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def _rounded(m: dict) -> dict:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k != "segments"}
    out["segments"] = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in seg.items()}
                       for name, seg in m["segments"].items()}
    return out


def write_plots(out: Path, res: StreamResult, latencies_ms: list[float], k: int) -> dict[str, str]:
    """HR@K over the stream for every system, and the latency histogram, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    n_scored = max((len(h) for h in res.hits.values()), default=0)
    window = max(1, min(max(50, min(2000, n_scored // 20)), n_scored))
    fig, ax = plt.subplots(figsize=(9, 5))
    plotted = 0
    for name, hits in ((n, h) for n, h in res.hits.items() if not n.startswith(ABLATION)):
        pts = windowed_hit_rate(hits, window)
        if pts:
            plotted += 1
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, linewidth=2.2 if name == "streamrec" else 1.2)
    ax.set_xlabel("scored clicks, in stream order")
    ax.set_ylabel(f"HR@{k} over the last {window} scored clicks")
    ax.set_title(f"HR@{k} over the stream")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hr_over_stream.png", dpi=110)
    plt.close(fig)
    plots["hr_over_stream"] = "hr_over_stream.png"

    fig, ax = plt.subplots(figsize=(9, 4))
    if latencies_ms:
        a = np.asarray(latencies_ms)
        ax.hist(a, bins=60, color="#3572a5")
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            v = float(np.percentile(a, q))
            ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} {v:.0f} ms")
        ax.legend()
    ax.set_xlabel("latency, ms (event sent -> list produced)")
    ax.set_ylabel("events")
    ax.set_title("Latency of streamrec's lists")
    fig.tight_layout()
    fig.savefig(out / "latency_histogram.png", dpi=110)
    plt.close(fig)
    plots["latency_histogram"] = "latency_histogram.png"
    return plots


def render_report(r: dict, plots: dict[str, str]) -> str:
    """``report.md``: the side-by-side table, segments, latency and throughput, plots."""
    k = r["k"]
    lines = [f"# streamrec eval: {r['dataset']}", "",
             f"{r['events']} events ({r['users']} users, {r['catalog_items']} catalog items), K = {k}. "
             f"Each click of a user with an earlier event is scored against the list produced after that "
             f"user's previous event; seen items are excluded for every system.", "",
             "| system | HR@K | NDCG@K | MRR | coverage | clicks scored | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    best = max(v["hr"] for v in r["systems"].values()) if r["systems"] else 0
    for name, m in r["systems"].items():
        hr = f"**{m['hr']:.4f}**" if m["hr"] == best else f"{m['hr']:.4f}"
        secs = r["system_seconds"].get(name)
        lines.append(f"| {name} | {hr} | {m['ndcg']:.4f} | {m['mrr']:.4f} | {m['coverage']:.4f} | "
                     f"{m['events_scored']} | {'pipeline' if secs is None else f'{secs:.1f}'} |")
    label = {COLD_ITEMS: "cold items"}
    lines += ["", "By the user's history length when the list was made (earlier events of the user; a click "
              "after exactly one earlier event counts in the totals only), and for clicks on cold items (the "
              f"item had fewer than {COLD_CLICKS} earlier clicks in the stream, by any user; any history length):",
              "",
              "| system | " + " | ".join(f"HR@K {n} | NDCG@K {n} | MRR {n} | coverage {n} | scored {n}"
                                       for n in (label.get(seg, seg) for seg in SEGMENT_NAMES)) + " |",
              "|---|" + "---:|" * (5 * len(SEGMENT_NAMES))]
    for name, m in r["systems"].items():
        cells = []
        for seg in SEGMENT_NAMES:
            v = m["segments"][seg]
            cells += [f"{v['hr']:.4f}", f"{v['ndcg']:.4f}", f"{v['mrr']:.4f}", f"{v['coverage']:.4f}",
                      str(v["events_scored"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lat = r["latency_ms"]
    lines += ["", "## The pipeline", "",
              f"- throughput: {r['throughput_eps']} events/s with at most {r['in_flight']} events unanswered",
              f"- latency ({r['latency_from']}): p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms",
              f"- lists: {r['events_answered']} for {r['events']} events; dead-lettered {r['dead_lettered']} "
              f"{r['dead_letter_reasons'] or ''}; duplicates {r['duplicates']}",
              f"- catalog indexed in {r['catalog_index_s']} s; stack {r['stack']}",
              *_stage_line(r.get("stages_ms_per_event")),
              *_cpu_line(r.get("cpu_ms_per_event"), r.get("machine", {}).get("cpus")),
              f"- whole run: {r['wall_s']} s on {r['machine']['cpus']} CPUs", ""]
    if r.get("ablations"):
        base = r["ablations"].get("all")
        lines += ["## Ablations", "",
                  "streamrec in one process (the worker's pipeline over in-memory stores, the same encoder and "
                  "events), with every signal (`all`) and with one signal off at a time; Δ is the change of "
                  "HR@K from `all`.", "",
                  "| run | HR@K | Δ HR@K | NDCG@K | HR@K 2-5 | HR@K 6+ | HR@K cold items | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in r["ablations"].items():
            delta = "" if base is None or name == "all" else f"{m['hr'] - base['hr']:+.4f}"
            seg = m["segments"]
            lines.append(f"| {name} | {m['hr']:.4f} | {delta} | {m['ndcg']:.4f} | {seg['2-5']['hr']:.4f} | "
                         f"{seg['6+']['hr']:.4f} | {seg[COLD_ITEMS]['hr']:.4f} | {m['seconds']:.1f} |")
        lines.append("")
    if r["skipped"]:
        lines += ["Peers left out: " + "; ".join(f"{n}: {why}" for n, why in r["skipped"].items()), ""]
    for title, name in (("HR@K over the stream", "hr_over_stream"), ("Latency", "latency_histogram")):
        if name in plots:
            lines += [f"![{title}]({plots[name]})", ""]
    return "\n".join(lines)
