"""The profile store: user profiles, applied-event ids, popularity and counters.

``open_profile_store(url)`` picks the implementation by scheme: ``redis://`` / ``rediss://`` /
``unix://`` (Redis), ``memory://`` (in-process, for unit tests and trials).

Every write of a profile is one atomic compare-and-set that also records the ids of the events
it applied, so an event redelivered after a crash is recognised and never applied twice.
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from models.profile import Explainer, Profile

STAT_FIELDS = ("events_in", "events_applied", "duplicates", "recommendations_out", "dead_letters",
               "items_upserted", "items_deleted", "requests_answered", "users_forgotten")


class ConflictError(RuntimeError):
    """The profile changed since it was read (another writer); read it again and retry."""


@dataclass
class PopularityUpdate:
    item_id: str
    scene: Optional[str]
    timestamp: float
    weight: float


@dataclass
class CoClick:
    """A click on ``item_id`` by a user whose earlier clicks were ``previous``."""

    item_id: str
    previous: Sequence[str]


class ProfileStore(abc.ABC):
    """Where profiles live. All methods are coroutines; implementations must be safe to share
    between the agents of one worker."""

    @abc.abstractmethod
    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """Profiles of ``user_ids`` (an empty profile, version 0, for an unknown user)."""

    @abc.abstractmethod
    async def applied(self, user_ids_event_ids: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (user_id, event_id): was that event already applied to that user?"""

    @abc.abstractmethod
    async def commit(self, profile: Profile, expected_version: int, new_seen: Iterable[str],
                     event_ids: Sequence[str]) -> int:
        """Write ``profile`` if its stored version is still ``expected_version`` and none of
        ``event_ids`` was applied; returns the new version. Raises :class:`ConflictError`."""

    @abc.abstractmethod
    async def forget(self, user_id: str) -> None:
        """Delete everything kept about ``user_id``."""

    @abc.abstractmethod
    async def bump_popularity(self, updates: Sequence[PopularityUpdate]) -> None:
        """Add decayed click weight to items, globally and per scene."""

    @abc.abstractmethod
    async def bump_cooccurrence(self, clicks: Sequence[CoClick]) -> None:
        """Count each clicked item once more, and each (item, earlier click) pair once more in
        both directions; each item keeps its ``cooccur_keep`` most frequent partners."""

    @abc.abstractmethod
    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """For each of ``item_ids``, up to ``n`` items most often clicked by the same users, each
        with its co-click count over sqrt(clicks of one * clicks of the other), best first."""

    @abc.abstractmethod
    async def popular(self, scene: Optional[str], n: int) -> list[tuple[str, float]]:
        """The ``n`` most popular items now (in ``scene`` when given and known)."""

    @abc.abstractmethod
    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        """Register catalog items as (item_id, timestamp, category)."""

    @abc.abstractmethod
    async def remove_items(self, item_ids: Sequence[str], scenes: Sequence[str]) -> None:
        """Forget deleted items in popularity and newest lists."""

    @abc.abstractmethod
    async def newest(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` newest catalog items."""

    @abc.abstractmethod
    async def category_count(self) -> int:
        """How many categories the catalog has."""

    @abc.abstractmethod
    async def incr_stats(self, counts: dict[str, int]) -> None:
        """Add to the worker counters."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]:
        """The worker counters."""

    async def close(self) -> None:
        """Release connections."""


# -- encoding of a profile into flat fields -------------------------------------------------------

def encode_profile(p: Profile) -> dict[str, bytes]:
    """The hash fields of a profile (the seen set and version are kept apart)."""
    meta = {
        "interest": p.interest, "history": p.history, "clicks": p.clicks, "queries": p.queries,
        "last_time": p.last_time, "scenes": sorted(p.scenes), "intent_strength": p.intent_strength,
        "explainers": [{"kind": e.kind, "label": e.label, "ref": e.ref} for e in p.explainers],
    }
    fields = {"meta": json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()}
    if p.long is not None:
        fields["long"] = p.long.astype(np.float32).tobytes()
    if p.short is not None:
        fields["short"] = p.short.astype(np.float32).tobytes()
    if p.intent is not None:
        fields["intent"] = p.intent.astype(np.float32).tobytes()
    for scene, v in p.scenes.items():
        fields["sc:" + scene] = v.astype(np.float32).tobytes()
    if p.explainers:
        fields["ex"] = np.stack([e.vector for e in p.explainers]).astype(np.float16).tobytes()
    return fields


def decode_profile(user_id: str, fields: dict[bytes | str, bytes], seen: Iterable[bytes | str]) -> Profile:
    """Inverse of :func:`encode_profile`."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    p = Profile(user_id=user_id, version=int(f.get("v", 0) or 0))
    p.seen = {s.decode() if isinstance(s, bytes) else s for s in seen}
    if "meta" not in f:
        return p
    meta = json.loads(f["meta"])
    p.interest = {k: float(v) for k, v in meta["interest"].items()}
    p.history = meta["history"]
    p.clicks, p.queries, p.last_time = meta["clicks"], meta["queries"], meta["last_time"]
    if "long" in f:
        p.long = np.frombuffer(f["long"], dtype=np.float32).copy()
    if "short" in f:
        p.short = np.frombuffer(f["short"], dtype=np.float32).copy()
    if "intent" in f:
        p.intent = np.frombuffer(f["intent"], dtype=np.float32).copy()
        p.intent_strength = float(meta.get("intent_strength", 0.0))
    for scene in meta["scenes"]:
        p.scenes[scene] = np.frombuffer(f["sc:" + scene], dtype=np.float32).copy()
    if meta["explainers"]:
        vecs = np.frombuffer(f["ex"], dtype=np.float16).astype(np.float32).reshape(len(meta["explainers"]), -1)
        p.explainers = [Explainer(e["kind"], e["label"], e["ref"], v) for e, v in zip(meta["explainers"], vecs)]
    return p


def cooccur_pairs(clicks: Sequence[CoClick]) -> list[tuple[str, str]]:
    """The (a, b) increments of ``clicks``, both directions, never an item with itself."""
    out = []
    for c in clicks:
        for prev in dict.fromkeys(c.previous):
            if prev != c.item_id:
                out += [(c.item_id, prev), (prev, c.item_id)]
    return out


def normalised_cooccurrence(rows: dict[str, list[tuple[str, float]]], counts: dict[str, float],
                            n: int) -> dict[str, list[tuple[str, float]]]:
    """Co-click counts over sqrt(clicks of a * clicks of b), the best ``n`` per item."""
    out = {}
    for a, partners in rows.items():
        ca = counts.get(a, 0.0)
        scored = [(b, c / math.sqrt(ca * counts[b])) for b, c in partners if ca > 0 and counts.get(b, 0.0) > 0]
        scored.sort(key=lambda bc: (-bc[1], bc[0]))
        out[a] = scored[:n]
    return out


def decayed_weight(timestamp: float, reference: float, halflife_s: float, weight: float) -> float:
    """Click weight scaled by 2 ** ((t - ref) / halflife): adding these keeps a sum of weights that
    decays over event time without rewriting old entries."""
    return weight * math.pow(2.0, (timestamp - reference) / halflife_s)


def open_profile_store(url: str, key_prefix: str = "streamrec", *, dedupe_window: int = 10_000,
                       popularity_halflife_s: float = 6 * 3600.0, cooccur_keep: int = 200,
                       redis_options: Optional[dict] = None) -> ProfileStore:
    """The profile store for ``url`` (``redis://``, ``rediss://``, ``unix://`` or ``memory://``);
    ``redis_options`` are further redis-py arguments (credentials, TLS files)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        from streams.stores.redis_profiles import RedisProfileStore

        return RedisProfileStore(url, key_prefix, dedupe_window=dedupe_window,
                                 popularity_halflife_s=popularity_halflife_s, cooccur_keep=cooccur_keep,
                                 options=redis_options)
    if scheme == "memory":
        from streams.stores.memory_profiles import MemoryProfileStore

        return MemoryProfileStore(dedupe_window=dedupe_window, popularity_halflife_s=popularity_halflife_s,
                                  cooccur_keep=cooccur_keep)
    raise ValueError(f"no profile store for URL scheme {scheme!r} (use redis://, rediss://, unix:// or memory://)")
