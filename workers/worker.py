"""The worker process: build the encoder and stores from settings, then run the Faust app."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from schemas import Limits
from streams.pipeline import ItemCache, Pipeline
from workers.settings import Settings

log = logging.getLogger("streamrec.worker")


def build_pipeline(settings: Settings):
    """The encoder, the stores and the pipeline over them."""
    from streams.security import redis_options
    from streams.stores import open_item_index, open_profile_store

    encoder = settings.open_encoder()
    log.info("encoder %s on %s (%s)", encoder.version, encoder.backend, getattr(encoder, "device", "cpu"))
    profiles = open_profile_store(settings.redis_url, settings.key_prefix, settings.store_options(),
                                  redis_options=redis_options(settings))
    items = open_item_index(settings.milvus_uri, encoder.dim, settings.milvus_collection,
                            settings.milvus_token.get_secret_value(), settings.milvus_consistency,
                            settings.milvus_index_type, settings.milvus_flush_writes, settings.milvus_timeout_s,
                            encoder=encoder.version)
    from streams.catalog_gate import CatalogGate
    from streams.stores.eventlog import KafkaEventLog

    offsets = KafkaEventLog.from_settings(settings, client_id=f"{settings.app_id}-catalog-gate")
    gate = CatalogGate(lambda: offsets.end_offsets(settings.topic_catalog), profiles)
    pipeline = Pipeline(profiles, items, encoder, settings.model, Limits.from_settings(settings), k=settings.k,
                        item_cache=ItemCache(settings.item_cache_size, settings.item_cache_ttl_s),
                        catalog_caught_up=gate)
    pipeline.closers.append(offsets.close)
    return pipeline


def limit_blas_threads(n: int) -> contextlib.AbstractContextManager:
    """Run numpy's BLAS on ``n`` threads (0: leave the library's default) from now on, or until the
    returned context exits: the pipeline's products are small, and idle BLAS threads spin."""
    if not n:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(n, user_api="blas")


def tune_gc(young_threshold: int) -> None:
    """Collect cycles less often: the young generation after ``young_threshold`` allocations (0:
    leave Python's settings), the older ones after 20 and 100 collections of the one below. What
    exists now (modules, the encoder, the clients) is frozen out of every later collection. The
    worker's garbage is freed by reference counting; the collector finds little, and by default
    it ran every 700 allocations and scanned everything the worker keeps."""
    import gc

    if not young_threshold:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, 20, 100)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Check that Kafka, Redis and Milvus let the worker in (raises
    :class:`workers.preflight.ServiceError`), create the topics, load the encoder, and consume until
    stopped (SIGTERM or Ctrl-C). An agent stopped by an error that no retry fixes stops the worker
    with exit status ``EXIT_AGENT_CRASHED`` (70), for the orchestrator to restart it."""
    import asyncio

    import faust

    from streams.app import create_app
    from streams.stores.eventlog import KafkaEventLog, all_topics
    from workers.preflight import preflight

    limit_blas_threads(settings.blas_threads)  # for the life of the process
    asyncio.run(preflight(settings))
    log.info("startup checks passed")
    created = KafkaEventLog.from_settings(settings).ensure_topics(
        all_topics(settings), settings.topic_partitions, settings.topic_replication)
    if created:
        log.info("created topics %s", created)
    pipeline = build_pipeline(settings)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings, pipeline)
    tune_gc(settings.gc_young_threshold)
    from streams.logs import logging_config

    worker = faust.Worker(app, loglevel=loglevel, quiet=True, logging_config=logging_config(loglevel, settings.log_format))
    try:
        worker.execute_from_commandline()
    finally:
        if app.agent_errors:
            from streams.app import EXIT_AGENT_CRASHED

            print(f"streamrec worker: stopped: {'; '.join(app.agent_errors)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_AGENT_CRASHED)
