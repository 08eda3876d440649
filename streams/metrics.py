"""The worker's own measurements: time per stage of the hot path, batches and events, served as
Prometheus text on ``/metrics`` beside ``/health`` (``serve``).

Stages: ``parse`` (decode and validate), ``redis`` (every profile store call), ``milvus`` (every
item index call), ``encoder``, ``ranking`` (features, scores, lists), ``process`` (a batch's
compute: parse, ranking and the reads), ``publish`` (until the broker confirms) and ``commit`` (the
batch's Redis writes, also counted in ``redis``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger("streamrec.metrics")

STAGES = ("parse", "redis", "milvus", "encoder", "ranking", "process", "publish", "commit")


class Metrics:
    """Seconds and calls per stage, and counters (thread-safe: stages run in executor threads too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = {s: 0.0 for s in STAGES}
        self.calls = {s: 0 for s in STAGES}
        self.counters: dict[str, float] = {"batches": 0, "events": 0}
        self.last_batch_time: Optional[float] = None
        self.started = time.time()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.calls[stage] = self.calls.get(stage, 0) + 1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def batch(self, events: int) -> None:
        with self._lock:
            self.counters["batches"] += 1
            self.counters["events"] += events
            self.last_batch_time = time.time()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"seconds": dict(self.seconds), "calls": dict(self.calls), **dict(self.counters),
                    "last_batch_time": self.last_batch_time, "uptime_s": time.time() - self.started}

    def render(self) -> str:
        """Prometheus text exposition."""
        snap = self.snapshot()
        lines = ["# HELP streamrec_stage_seconds_total Wall time spent in each stage of the hot path.",
                 "# TYPE streamrec_stage_seconds_total counter"]
        lines += [f'streamrec_stage_seconds_total{{stage="{s}"}} {v:.6f}' for s, v in snap["seconds"].items()]
        lines += ["# HELP streamrec_stage_calls_total Calls of each stage.", "# TYPE streamrec_stage_calls_total counter"]
        lines += [f'streamrec_stage_calls_total{{stage="{s}"}} {v}' for s, v in snap["calls"].items()]
        for name, help_ in (("batches", "Micro-batches of events done (published and written)."),
                            ("events", "Events in those batches.")):
            lines += [f"# HELP streamrec_{name}_total {help_}", f"# TYPE streamrec_{name}_total counter",
                      f"streamrec_{name}_total {int(snap[name])}"]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from Prometheus text (what ``/metrics`` serves)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Timed:
    """``target`` with each public method timed under ``stage`` (coroutines and plain calls)."""

    def __init__(self, target: Any, metrics: Metrics, stage: str) -> None:
        self._target, self._metrics, self._stage = target, metrics, stage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name.startswith("_") or not callable(attr):
            return attr
        metrics, stage = self._metrics, self._stage
        if inspect.iscoroutinefunction(attr):
            @functools.wraps(attr)
            async def timed_async(*args, **kwargs):
                with metrics.stage(stage):
                    return await attr(*args, **kwargs)
            return timed_async

        @functools.wraps(attr)
        def timed(*args, **kwargs):
            with metrics.stage(stage):
                return attr(*args, **kwargs)
        return timed


async def serve(metrics: Metrics, host: str, port: int, health: Callable[[], dict]) -> Any:
    """Serve ``/metrics`` and ``/health`` (JSON; HTTP 503 while not ``ok``) until cancelled; returns
    the aiohttp runner."""
    from aiohttp import web

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain")

    async def health_handler(request: web.Request) -> web.Response:
        body = {**health(), "metrics": metrics.snapshot()}
        return web.Response(text=json.dumps(body), content_type="application/json",
                            status=200 if body.get("ok") else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/health", health_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics, health on /health", host, port)
    return runner


__all__ = ["Metrics", "STAGES", "Timed", "parse_metrics", "serve"]
