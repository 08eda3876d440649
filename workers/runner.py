"""Driving a worker from outside, as the demo, the benchmark and the integration tests do: start it
as a process, publish events, wait for its answers on the output topic."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from streams.stores.eventlog import KafkaEventLog, LogRecord, all_topics
from streams.stores.redis_profiles import connect, read_stats
from workers.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """``STREAMREC_*`` variables that reproduce ``settings`` in a child process."""
    env = {}
    for name, value in settings:
        key = "STREAMREC_" + name.upper()
        if hasattr(value, "get_secret_value"):
            env[key] = value.get_secret_value()
        elif hasattr(value, "__dataclass_fields__"):
            for sub in value.__dataclass_fields__:
                env[f"{key}__{sub.upper()}"] = str(getattr(value, sub))
        else:
            env[key] = str(value)
    return env


@dataclass
class WorkerProcess:
    """A ``streamrec worker`` child process."""

    settings: Settings
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    extra_env: dict = field(default_factory=dict)

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **settings_env(self.settings), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--loglevel", os.environ.get("STREAMREC_LOGLEVEL", "warning")],
                                     stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no offset commit, nothing flushed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a clean shutdown that commits offsets), then SIGKILL after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()



def encode_line(obj: dict) -> tuple[Optional[bytes], bytes]:
    """(key, value) for an input object: keyed by user_id (events, requests) or item_id (catalog)."""
    key = obj.get("user_id") if obj.get("type") in ("click", "query", "forget", "request") else obj.get("item_id")
    return (str(key).encode() if key is not None else None), json.dumps(obj, ensure_ascii=False).encode()


def topic_for(settings: Settings, obj: dict) -> str:
    kind = obj.get("type")
    if kind in ("item", "item_delete"):
        return settings.topic_catalog
    if kind == "request":
        return settings.topic_requests
    return settings.topic_events


def wait_stat(profiles_sync, prefix: str, name: str, target: int, timeout_s: float,
              worker: Optional[WorkerProcess] = None) -> int:
    """Wait until the worker's counter ``name`` reaches ``target`` (a deadline, no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    value = 0
    while time.monotonic() < deadline:
        value = read_stats(profiles_sync, prefix).get(name, 0)
        if value >= target:
            return value
        if worker is not None and not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise TimeoutError(f"counter {name} is {value} after {timeout_s:.0f} s, expected {target}"
                       + (f"\nworker log:\n{worker.log_tail()}" if worker else ""))


def read_outputs(log: KafkaEventLog, topic: str, want: Iterable[str], timeout_s: float,
                 worker: Optional[WorkerProcess] = None) -> dict[str, list[dict]]:
    """Read recommendation messages until every trigger id in ``want`` has one; returns all
    messages by trigger id."""
    want = set(want)
    got: dict[str, list[dict]] = {}
    missing = set(want)

    def until(batch: list[LogRecord]) -> bool:
        for r in batch[until.n:]:
            msg = json.loads(r.value)
            got.setdefault(msg["trigger_event_id"], []).append(msg)
            missing.discard(msg["trigger_event_id"])
        until.n = len(batch)
        if worker is not None and not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_tail()}")
        return not missing

    until.n = 0
    log.read(topic, until=until, timeout_s=timeout_s)
    if missing:
        raise TimeoutError(f"{len(missing)} of {len(want)} events unanswered after {timeout_s:.0f} s, e.g. "
                           f"{sorted(missing)[:5]}" + (f"\nworker log:\n{worker.log_tail()}" if worker else ""))
    return got


@contextlib.contextmanager
def worker_on_stack(settings: Settings, stack, base: Path, name: str) -> Iterator[tuple]:
    """A worker on ``stack`` with fresh names (app id, key prefix), its topics created; yields
    (settings, event log, worker, sync Redis client) and stops them all afterwards."""
    run = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={
        "kafka_bootstrap": stack.kafka_bootstrap, "redis_url": stack.redis_url, "milvus_uri": stack.milvus_uri,
        "app_id": f"{name}-{run}", "key_prefix": f"{name}-{run}", "data_dir": str(base / "data"),
        "kafka_rebalance_timeout_s": 3.0})  # one worker: no other member to wait for
    log = KafkaEventLog(s.kafka_bootstrap)
    log.ensure_topics(all_topics(s), s.topic_partitions)
    worker = WorkerProcess(s, base / "worker.log").start()
    r = connect(s.redis_url, asyncio=False)
    try:
        yield s, log, worker, r
    finally:
        worker.stop()
        r.close()
        log.close()


def metrics_scraper(s: Settings):
    """Reads the worker's ``/metrics``."""
    import urllib.request

    from streams.metrics import parse_metrics

    url = f"http://127.0.0.1:{s.metrics_port}/metrics"

    def scrape(after: Optional[dict[str, float]] = None, events: int = 0, timeout_s: float = 60.0) -> dict[str, float]:
        """The metrics now; with ``after``, once ``events`` more are counted (a batch counts once
        written, just after its lists are out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(url, timeout=10) as resp:
                got = parse_metrics(resp.read().decode())
            key = "streamrec_events_total"
            if after is None or got[key] - after[key] >= events or time.monotonic() > deadline:
                return got
            time.sleep(0.05)
    return scrape


def stack_processes(stack, worker: WorkerProcess) -> dict[str, int]:
    """The pid of each part a run's CPU is counted for (``workers.cpu``): the worker and the
    stack's servers it started (``broker``, ``redis``, ``milvus``; none for servers it was given)."""
    out = {"worker": worker.proc.pid} if worker.proc is not None else {}
    out.update({{"kafka": "broker"}.get(name, name): p.pid for name, p in getattr(stack, "procs", {}).items()})
    return out


def stages_per_event(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Milliseconds per event in each stage between two scrapes (``streams.metrics``): the wall
    time of its calls. ``overlapped`` is how much of them ran side by side (they then add up to
    more than ``process``); ``other`` the batch compute that no call took (the pipeline's own)."""
    from streams.metrics import STAGES

    events = after["streamrec_events_total"] - before["streamrec_events_total"]
    ms = {st: 1e3 * (after[f'streamrec_stage_seconds_sum{{stage="{st}"}}'] -
                     before[f'streamrec_stage_seconds_sum{{stage="{st}"}}']) / max(events, 1) for st in STAGES}
    # process holds parse, milvus, encoder, ranking and the Redis reads; commit holds the Redis writes.
    # A batch's searches run beside its reads: what the calls' wall times add up to beyond process
    # is time they ran side by side ("overlapped"); else the rest is the pipeline's own ("other").
    reads = ms["redis"] - ms["commit"]
    rest = ms["process"] - ms["parse"] - reads - ms["milvus"] - ms["encoder"] - ms["ranking"]
    ms["other"], ms["overlapped"] = max(0.0, rest), max(0.0, -rest)
    out = {st: round(v, 3) for st, v in ms.items()}
    out["events"] = int(events)
    batches = after["streamrec_batches_total"] - before["streamrec_batches_total"]
    out["events_per_batch"] = round(events / max(batches, 1), 1)
    # lists whose index search was done ahead, while the batch before theirs ran (Pipeline._look_ahead)
    hit, miss = (after.get(f'streamrec_lookahead_searches_total{{outcome="{o}"}}', 0.0) -
                 before.get(f'streamrec_lookahead_searches_total{{outcome="{o}"}}', 0.0) for o in ("hit", "miss"))
    out["searched_ahead"] = round(hit / (hit + miss), 3) if hit + miss else 0.0
    # query texts encoded while the batch before theirs ran (Pipeline.prefetch)
    hit, miss = (after.get(f'streamrec_query_prefetch_total{{outcome="{o}"}}', 0.0) -
                 before.get(f'streamrec_query_prefetch_total{{outcome="{o}"}}', 0.0) for o in ("hit", "miss"))
    out["queries_encoded_ahead"] = round(hit / (hit + miss), 3) if hit + miss else 0.0
    return out


__all__ = ["worker_on_stack", "WorkerProcess", "settings_env", "encode_line", "topic_for", "wait_stat", "read_outputs",
           "all_topics", "metrics_scraper", "stack_processes", "stages_per_event"]
