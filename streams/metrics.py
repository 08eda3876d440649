"""The worker's own measurements: time per stage of the hot path, batches and events, served as
Prometheus text on ``/metrics`` beside ``/health`` (``serve``).

Stages: ``parse`` (decode and validate), ``redis`` (every profile store call), ``milvus`` (every
item index call), ``encoder``, ``ranking`` (features, scores, lists), ``process`` (a batch's
compute: parse, ranking and the reads), ``publish`` (until the broker confirms), ``commit`` (the
batch's Redis writes, also counted in ``redis``) and ``batch`` (an events batch from its first try
to its commit, retries included).

Beside them: the worker's counters as ``streamrec stats`` names them (``streamrec_stats_total``),
dead letters by error code, retried calls by what was called, and whether each agent runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

log = logging.getLogger("streamrec.metrics")

STAGES = ("parse", "redis", "milvus", "encoder", "ranking", "process", "publish", "commit", "batch")


class Metrics:
    """The worker's metrics in their own ``prometheus_client`` registry: a latency histogram per
    stage (``streamrec_stage_seconds``), batches and events done, the last batch's time, the
    counters of the batches done, dead letters by code, retries, and agents running."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._stages = Histogram("streamrec_stage_seconds", "Wall time of each call of a stage of the hot path.",
                                 ["stage"], registry=self.registry, buckets=self.BUCKETS)
        self._batches = Counter("streamrec_batches", "Micro-batches of events done (published and written).",
                                registry=self.registry)
        self._events = Counter("streamrec_events", "Events in those batches.", registry=self.registry)
        self._last = Gauge("streamrec_last_batch_time_seconds", "Unix time the last events batch was done.",
                           registry=self.registry)
        self.probes = Counter("streamrec_exclusion_probes", "Lists whose candidates came from the batch's first "
                              "plain search (hit), or from a second search that over-fetched by the seen set or "
                              "excluded it in the index (miss).", ["outcome"], registry=self.registry)
        self.prefetched = Counter("streamrec_query_prefetch", "Query texts encoded while the batch before "
                                  "theirs ran (hit), or only when it ran (miss).",
                                  ["outcome"], registry=self.registry)
        self.lookahead = Counter("streamrec_lookahead_searches", "Lists whose index search was done ahead, while "
                                 "the batch before theirs ran, with exactly the vector, limit and filter they "
                                 "search with (hit), or searched when their batch ran (miss).", ["outcome"],
                                 registry=self.registry)
        self._stats = Counter("streamrec_stats", "The worker's counters (the names of `streamrec stats`: events_in, "
                              "events_applied, redelivered, dead_letters, recommendations_out, ...) for the "
                              "batches this process completed.", ["name"], registry=self.registry)
        self._dead = Counter("streamrec_dead_letters", "Messages sent to the dead-letter topic, by error code.",
                             ["error"], registry=self.registry)
        self._retries = Counter("streamrec_retries", "Failed tries of a call, retried after a backoff (a store, "
                                "the encoder or the broker unavailable).", ["call"], registry=self.registry)
        self._agents = Gauge("streamrec_agent_up", "1 while the agent consumes, 0 once it stopped or crashed.",
                             ["agent"], registry=self.registry)
        self._items = Gauge("streamrec_items", "Items in the item index (available or not), counted at scrape time.",
                            registry=self.registry)
        self._lag = Gauge("streamrec_consumer_lag", "Messages in an assigned partition after the worker's last "
                          "committed offset (its high watermark minus that position), at scrape time.",
                          ["topic", "partition"], registry=self.registry)
        for st in STAGES:
            self._stages.labels(st)
        for name in ("events_in", "events_applied", "redelivered", "dead_letters", "recommendations_out"):
            self._stats.labels(name)
        for outcome in ("hit", "miss"):
            self.probes.labels(outcome)
            self.prefetched.labels(outcome)
            self.lookahead.labels(outcome)
        self.started = time.time()
        self.last_batch_time: Optional[float] = None

    def add(self, stage: str, seconds: float) -> None:
        self._stages.labels(stage).observe(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def batch(self, events: int) -> None:
        self._batches.inc()
        self._events.inc(events)
        self.last_batch_time = time.time()
        self._last.set(self.last_batch_time)

    def counted(self, stats: dict[str, int], dead_letter_errors: Iterable[str] = ()) -> None:
        """A completed batch's counters, and the error code of each of its dead letters."""
        for name, n in stats.items():
            if n:
                self._stats.labels(name).inc(n)
        for error in dead_letter_errors:
            self._dead.labels(error).inc()

    def retried(self, call: str) -> None:
        self._retries.labels(call).inc()

    def agent(self, name: str, up: bool) -> None:
        self._agents.labels(name).set(1 if up else 0)

    def totals(self) -> dict[str, float]:
        """The counters of :meth:`counted` so far, by name."""
        return {s.labels["name"]: s.value for fam in self._stats.collect() for s in fam.samples
                if s.name.endswith("_total")}

    def items(self, n: int) -> None:
        self._items.set(n)

    def lag(self, lags: dict[tuple[str, int], int]) -> None:
        """The consumer lag of each assigned partition (partitions no longer assigned drop out)."""
        self._lag.clear()
        for (topic, partition), n in lags.items():
            self._lag.labels(topic, str(partition)).set(max(0, n))

    def snapshot(self) -> dict[str, Any]:
        """Seconds and calls per stage, batches and events (from the registry)."""
        got = parse_metrics(self.render())
        return {"seconds": {st: got.get(f'streamrec_stage_seconds_sum{{stage="{st}"}}', 0.0) for st in STAGES},
                "calls": {st: int(got.get(f'streamrec_stage_seconds_count{{stage="{st}"}}', 0)) for st in STAGES},
                "batches": int(got.get("streamrec_batches_total", 0)), "events": int(got.get("streamrec_events_total", 0)),
                "last_batch_time": self.last_batch_time, "uptime_s": time.time() - self.started}

    def render(self) -> str:
        """Prometheus text exposition."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from Prometheus text (what ``/metrics`` serves)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
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


async def serve(metrics: Metrics, host: str, port: int, health: Callable[[], dict],
                ready: Optional[Callable[[], dict]] = None,
                refresh: Optional[Callable[[], None]] = None,
                live: Optional[Callable[[Optional[str]], Any]] = None) -> Any:
    """Serve ``/metrics`` (after ``refresh()``, which updates what is read at scrape time),
    ``/health`` (liveness) and ``/ready`` (readiness; ``ready`` may be a coroutine function), the
    last two as JSON with HTTP 503 while not ``ok``, and with ``live`` (a coroutine function of an optional user id) the live page on
    ``/`` and its data on ``/api/live``, until cancelled; returns the aiohttp runner."""
    from aiohttp import web

    async def metrics_handler(request: web.Request) -> web.Response:
        if refresh is not None:
            try:
                got = refresh()
                if inspect.isawaitable(got):
                    await got
            except Exception:  # noqa: BLE001 - the other metrics still go out
                log.debug("metrics refresh failed", exc_info=True)
        return web.Response(text=metrics.render(), content_type="text/plain")

    async def health_handler(request: web.Request) -> web.Response:
        body = {**health(), "metrics": metrics.snapshot()}
        return web.Response(text=json.dumps(body), content_type="application/json",
                            status=200 if body.get("ok") else 503)

    async def ready_handler(request: web.Request) -> web.Response:
        body = (ready or health)()
        if inspect.isawaitable(body):
            body = await body
        return web.Response(text=json.dumps(body), content_type="application/json",
                            status=200 if body.get("ok") else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/ready", ready_handler)
    if live is not None:
        from streams.ui import PAGE

        async def page_handler(request: web.Request) -> web.Response:
            return web.Response(text=PAGE, content_type="text/html")

        async def live_handler(request: web.Request) -> web.Response:
            return web.Response(text=json.dumps(await live(request.query.get("user"))),
                                content_type="application/json")

        app.router.add_get("/", page_handler)
        app.router.add_get("/api/live", live_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics, /health and /ready", host, port)
    return runner


__all__ = ["Metrics", "STAGES", "Timed", "parse_metrics", "serve"]
