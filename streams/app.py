"""The Faust app: topics and thin agents over :class:`streams.pipeline.Pipeline`.

Agents consume raw bytes in micro-batches with ``noack_take`` (so a failure never acks an event),
hand them to the pipeline, publish what it returns, wait for the broker to confirm, let the
pipeline write the batch's state, and only then ack. Every agent runs with concurrency 1: each user's events are handled in order by the
one worker that owns the user's partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence

import faust

from streams.pipeline import Output, Pipeline, RawMessage
from streams.retry import Backoff, retry_forever, transient
from streams.stores.profiles import ConflictError
from streams.transport import App
from streams.settings import Settings

log = logging.getLogger("streamrec.agents")

#: How long an events batch taken again waits for the rest of its events before it goes without them.
REDO_WAIT_S = 10.0
#: The worker's exit status after an agent stopped on an error that no retry fixes (EX_SOFTWARE).
EXIT_AGENT_CRASHED = 70
#: How often a /metrics scrape may count the items in the index (a query to Milvus).
ITEM_COUNT_EVERY_S = 10.0


def broker_urls(settings: Settings) -> list[str]:
    """Faust broker URLs from the bootstrap list."""
    return [f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",") if h.strip()]


def broker_credentials(settings: Settings) -> Optional[faust.auth.Credentials]:
    """Faust's credentials for the settings' Kafka security (producer and consumers alike):
    SASL PLAIN or SCRAM, over TLS for SASL_SSL; TLS alone for SSL; ``None`` for PLAINTEXT."""
    from streams.security import kafka_sasl, kafka_ssl_context

    ctx = kafka_ssl_context(settings)
    if kafka_sasl(settings):
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password.get_secret_value(),
                                     mechanism=settings.kafka_sasl_mechanism, ssl_context=ctx)
    return faust.SSLCredentials(ctx) if ctx is not None else None


def dead_letter_error(value: bytes) -> str:
    """The error code of a dead letter (``streamrec.v1.DeadLetter``)."""
    try:
        return str(json.loads(value).get("error") or "unknown")
    except (ValueError, AttributeError):
        return "unknown"


def create_app(settings: Settings, pipeline: Optional[Pipeline] = None) -> faust.App:
    """Build the Faust app. ``pipeline`` may be ``None`` only to inspect the app (``faust -A``)."""
    app = App(
        settings.app_id,
        broker=broker_urls(settings),
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=str(Path(settings.data_dir) / "faust-{conf.id}"),
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_every=1000,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_rebalance_timeout=settings.kafka_rebalance_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        broker_commit_interval=1.0,
        key_serializer="raw",
        value_serializer="raw",
    )
    app.fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
    app.agent_errors = []  # what stopped an agent: the worker then exits with EXIT_AGENT_CRASHED

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    events, catalog, requests = topic(settings.topic_events), topic(settings.topic_catalog), topic(settings.topic_requests)
    recommendations, deadletter = topic(settings.topic_recommendations), topic(settings.topic_deadletter)
    backoff = Backoff(base_s=0.1, cap_s=5.0)

    async def publish(out: Output) -> None:
        futures = []
        for key, value in out.recommendations:
            futures.append(await recommendations.send(key=key, value=value))
        for key, value in out.dead_letters:
            futures.append(await deadletter.send(key=key, value=value))
        if futures:
            await asyncio.gather(*futures)

    def no_conflict(exc: BaseException) -> bool:  # a conflict means: process the batch again
        return transient(exc) and not isinstance(exc, ConflictError)

    async def run_batch(name: str, process: Callable[[Sequence[RawMessage]], Awaitable[Output]],
                        raw: list[RawMessage]) -> None:
        # Compute, publish, then write: a list is out before its event counts as applied.
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            out = await retry_forever(lambda: process(raw), backoff, what=f"{name} batch", log=log,
                                      on_retry=metrics.retried)
            t1 = time.perf_counter()
            await retry_forever(lambda out=out: publish(out), backoff, what=f"{name} publish", log=log,
                                on_retry=metrics.retried)
            if view is not None:  # the live page is served: it shows the lists just published
                view.observe(out.recommendations)
            t2 = time.perf_counter()
            if name == "events":
                metrics.add("process", t1 - t0)
                metrics.add("publish", t2 - t1)
            try:
                await retry_forever(lambda out=out: pipeline.commit(out), backoff, what=f"{name} commit",
                                    log=log, is_transient=no_conflict, on_retry=metrics.retried)
                break
            except ConflictError as exc:
                log.info("%s batch: %s; processing it again", name, exc)
        metrics.counted(out.stats, (dead_letter_error(v) for _, v in out.dead_letters))
        if name == "events":
            metrics.add("commit", time.perf_counter() - t2)
            metrics.add("batch", time.perf_counter() - started)
            metrics.batch(len(raw))
        log.debug("%s batch of %d: process %.1f ms, publish %.1f ms, commit %.1f ms", name, len(raw),
                  (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)

    def consume(name: str, process: Callable[[Sequence[RawMessage]], Awaitable[Output]], again: bool = False,
                prepare: Optional[Callable[[Sequence[RawMessage], bool], None]] = None):
        """An agent over ``process``. With ``again``, a batch whose lists may be out but whose effects
        are not applied is taken again as it was (:meth:`Pipeline.next_batch`): events held for a
        later batch wait, and events of that batch not yet held are waited for up to
        ``REDO_WAIT_S``. Events are taken from the stream while a batch runs (up to two batches
        held); ``prepare`` is shown the events held behind the running batch, and whether they are
        a full batch (then they are exactly the next one). With ``again``, the pipeline sees the
        events held behind the running batch (``Pipeline.upcoming``)."""
        async def agent(stream: faust.StreamT) -> None:
            agents[name] = "running"
            metrics.agent(name, True)
            try:
                await batches(stream)
            except asyncio.CancelledError:
                agents[name] = "stopped"
                metrics.agent(name, False)
                raise
            except Exception as exc:  # noqa: BLE001 - an error retry_forever does not retry
                # Faust would start the agent again mid-stream, past events it took and never
                # acked; stop the worker instead, so that it is restarted from the committed
                # offsets, and say so (/health fails meanwhile).
                said = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                agents[name] = f"crashed: {said}"
                metrics.agent(name, False)
                app.agent_errors.append(f"{name} agent: {said}")
                log.critical("%s agent stopped on an error that no retry fixes: %s; stopping the worker (exit %d) "
                             "so that it is restarted from its last committed offsets", name, said,
                             EXIT_AGENT_CRASHED, exc_info=exc)
                app.conf.stream_wait_empty = False  # its taken events will never be acked: do not wait for them
                os.kill(os.getpid(), signal.SIGTERM)

        def raw_of(events: Sequence) -> list[RawMessage]:
            return [RawMessage(ev.message.topic, ev.message.partition, ev.message.offset, ev.message.key,
                               ev.message.value) for ev in events]

        async def batches(stream: faust.StreamT) -> None:
            held: list = []  # taken from the stream, not yet acked, in order; the reader appends
            running: set[int] = set()  # ids of the held events in the batch that runs now
            arrived, room = asyncio.Event(), asyncio.Event()

            def waiting() -> list:  # the held events behind the running batch, at most a batch of them
                return [ev for ev in held if id(ev) not in running][: settings.batch_max]

            def prepare_next() -> None:  # shows ``prepare`` the events held behind the running batch
                if prepare is None or not running:
                    return
                behind = waiting()
                if behind:
                    prepare(raw_of(behind), len(behind) == settings.batch_max)

            async def read() -> None:
                # The take generator is resumed as soon as a take is held, so the next events are
                # taken while a batch runs; at most two batches are held.
                async for batch in stream.noack_take(settings.batch_max, within=settings.batch_within_s):
                    held.extend(batch)
                    arrived.set()
                    prepare_next()
                    while running and len(held) >= 2 * settings.batch_max:  # not while waiting for more
                        room.clear()
                        await room.wait()

            if again and settings.search_ahead:  # the events batch: its searches begin while the one before it runs
                pipeline.upcoming = lambda: raw_of(waiting())
            reader = asyncio.ensure_future(read())
            try:
                waiting_since: Optional[float] = None
                more = False  # wait for events taken after the last look at what is held
                while True:
                    if more or not held:
                        got = asyncio.ensure_future(arrived.wait())
                        await asyncio.wait({got, reader}, return_when=asyncio.FIRST_COMPLETED)
                        got.cancel()
                        if reader.done():
                            reader.result()  # the stream stopped (or its error is raised)
                            return
                    arrived.clear()
                    more = False
                    if not held:
                        continue
                    raw = raw_of(held)
                    take: Optional[list[int]] = list(range(min(settings.batch_max, len(held))))
                    if again:
                        waited = waiting_since is not None and time.monotonic() - waiting_since >= REDO_WAIT_S
                        take = await retry_forever(lambda raw=raw, waited=waited: pipeline.next_batch(
                            raw, settings.batch_max, force=waited), backoff, what=f"{name} next batch", log=log,
                            on_retry=metrics.retried)
                        if take is None:  # wait for more events
                            waiting_since = waiting_since or time.monotonic()
                            more = True
                            room.set()
                            continue
                    waiting_since = None
                    taken = set(take)
                    running.update(id(held[i]) for i in take)
                    prepare_next()
                    try:
                        await run_batch(name, process, [raw[i] for i in take])
                        for i in take:
                            await stream.ack(held[i])
                    finally:
                        running.clear()
                    held[:] = [ev for i, ev in enumerate(held) if i not in taken]  # the reader only appends
                    room.set()
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        agent.__name__ = name
        return agent

    if pipeline is not None:
        from streams.ui import LiveView, user_view

        metrics = pipeline.metrics
        view = LiveView() if settings.metrics_port else None
        agents: dict[str, str] = {}

        if settings.metrics_port:
            @app.task
            async def serve_metrics() -> None:
                from streams.metrics import serve

                def health() -> dict:
                    return {"ok": bool(agents) and all(v == "running" for v in agents.values()), "agents": dict(agents)}

                counted_at = [float("-inf")]

                async def count_items() -> None:
                    """Count the index's items into the gauge (a Milvus query, outside the stage timings)."""
                    counted_at[0] = time.monotonic()
                    metrics.items(await asyncio.wait_for(pipeline._run(pipeline.items._target.count), 10.0))

                async def stores_reachable() -> dict[str, str]:
                    """One cheap read of each store (outside the stage timings); counts the items."""
                    out = {}
                    try:
                        await asyncio.wait_for(pipeline.profiles._target.stats(), 5.0)
                        out["redis"] = "ok"
                    except Exception as exc:  # noqa: BLE001 - reported, not raised
                        out["redis"] = f"unreachable: {type(exc).__name__}"
                    try:
                        await count_items()
                        out["milvus"] = "ok"
                    except Exception as exc:  # noqa: BLE001 - reported, not raised
                        out["milvus"] = f"unreachable: {type(exc).__name__}"
                    return out

                async def ready() -> dict:
                    """Live, both stores answering, in the consumer group and not rebalancing (a worker
                    beyond the partition count is ready with none: it stands by)."""
                    live = health()
                    stores = await stores_reachable()
                    ok = live["ok"] and group["assigned"] and not app.rebalancing and \
                        all(v == "ok" for v in stores.values())
                    return {"ok": ok, "agents": live["agents"], "stores": stores, "partitions": group["partitions"],
                            "rebalancing": bool(app.rebalancing)}

                async def refresh() -> None:
                    lag()
                    if time.monotonic() - counted_at[0] < ITEM_COUNT_EVERY_S:  # a scrape loop must not load Milvus
                        return
                    try:
                        await count_items()
                    except Exception:  # noqa: BLE001 - the gauge keeps its last value
                        log.debug("item count failed", exc_info=True)

                def lag() -> None:
                    consumer = app.consumer
                    # Faust keeps the committed offsets (the next to read) with no public view
                    committed = getattr(consumer, "_committed_offset", {})
                    lags = {}
                    for tp in consumer.assignment():
                        high = consumer.highwater(tp)  # the next offset to be written
                        if high is not None:
                            lags[(tp.topic, tp.partition)] = high - (committed.get(tp) or 0)
                    metrics.lag(lags)

                async def live(wanted: Optional[str]) -> dict:
                    totals = metrics.totals()
                    user = view.pick(wanted)
                    out = {"time": time.time(), "events_total": metrics.snapshot()["events"],
                           "lists_out": totals.get("recommendations_out", 0),
                           "dead_letters": totals.get("dead_letters", 0), "latency_ms": view.latency_ms(),
                           "user": None}
                    if user is not None:
                        profile, titles, dist = await pipeline.peek_user(user)
                        out["user"] = user_view(user, profile, view.lists.get(user, {}), titles, dist)
                    return out

                await serve(metrics, settings.metrics_host, settings.metrics_port, health, ready, refresh, live)

        app.agent(catalog, name="catalog", concurrency=1)(consume("catalog", pipeline.process_catalog))
        app.agent(events, name="events", concurrency=1)(consume("events", pipeline.process_events, again=True,
                                                                        prepare=pipeline.prefetch))
        app.agent(requests, name="requests", concurrency=1)(consume("requests", pipeline.process_requests))

        group = {"assigned": False, "partitions": 0}

        @app.on_before_shutdown.connect
        async def close_clients(*args, **kwargs) -> None:  # the consumer has stopped: no batch runs now
            await pipeline.close()
            log.info("closed the stores, the catalog gate's client and the thread pools")

        @app.on_partitions_revoked.connect
        async def partitions_moved(*args, **kwargs) -> None:  # another worker may begin batches on them
            pipeline.lose_positions()

        @app.on_partitions_assigned.connect
        async def partitions_assigned(*args, **kwargs) -> None:  # Faust sends (app, assigned)
            assigned = kwargs.get("assigned", args[-1] if args else ())
            group.update(assigned=True, partitions=len(assigned))
    return app
