"""The worker's pipeline in one process, over in-memory stores: the same code that a worker runs
(``streams.pipeline.Pipeline``), fed a data set in micro-batches, without Kafka, Redis or Milvus.

``streamrec eval --ablate`` uses it to run the model once per switched-off signal: each run is a
full pass over the data set, and the real stack would take as long per run as the main one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from models.params import ModelParams
from schemas import Limits
from streams.pipeline import ItemCache, Pipeline, RawMessage
from streams.stores import open_item_index
from streams.stores import StoreOptions, open_profile_store


class CachedEncoder:
    """Wraps an encoder: each distinct text is encoded once, however many runs ask for it."""

    def __init__(self, encoder: Any) -> None:
        self.inner = encoder
        self.dim = encoder.dim
        self.version = encoder.version
        self._vectors: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for t, v in zip(missing, self.inner.encode(missing), strict=True):
                self._vectors[t] = v
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


@dataclass
class Simulation:
    lists: dict[str, list[str]]  # the item ids of the list made after each event, by event id
    model: dict  # the ranker's learned state at the end (ProfileStore.model)
    stats: dict[str, int]


def simulate(catalog: Sequence[dict], events: Sequence[dict], encoder: Any, params: ModelParams,
             k: int = 10, batch: int = 64, options: StoreOptions = StoreOptions(),
             progress: Optional[Callable[[int], None]] = None) -> Simulation:
    """Run ``events`` (wire-format dicts, in order, one partition) through a fresh pipeline after
    indexing ``catalog``, ``batch`` events at a time. The timestamps of the data set are the
    clock, so no event is refused as from the future."""
    return asyncio.run(_simulate(catalog, events, encoder, params, k, batch, options, progress))


async def _simulate(catalog, events, encoder, params, k, batch, options, progress) -> Simulation:
    latest = max([float(e.get("timestamp", 0.0)) for e in (*catalog, *events)], default=0.0)
    pipe = Pipeline(open_profile_store("memory://", options=options), open_item_index("memory://", encoder.dim),
                    encoder, params, Limits(), k=k, item_cache=ItemCache(len(catalog) + 1024, 1e18),
                    clock=lambda: latest + 1.0)
    try:
        for start in range(0, len(catalog), 256):
            out = await pipe.process_catalog(_messages("catalog", catalog, start, 256))
            await pipe.commit(out)
        lists: dict[str, list[str]] = {}
        for start in range(0, len(events), batch):
            out = await pipe.process_events(_messages("events", events, start, batch))
            await pipe.commit(out)
            for _, value in out.recommendations:
                rec = json.loads(value)
                lists[rec["trigger_event_id"]] = [i["item_id"] for i in rec["items"]]
            if progress:
                progress(min(batch, len(events) - start))
        return Simulation(lists, await pipe.profiles.model(), await pipe.profiles.stats())
    finally:
        pipe.executor.shutdown(wait=False)
        pipe._encode_executor.shutdown(wait=False)


def _messages(topic: str, rows: Sequence[dict], start: int, n: int) -> list[RawMessage]:
    return [RawMessage(topic, 0, start + i, (r.get("user_id") or r.get("item_id") or "").encode(),
                       json.dumps(r).encode()) for i, r in enumerate(rows[start:start + n])]
