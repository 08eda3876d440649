"""The profile store: user profiles, per-item counters (popularity, co-clicks), catalog numbers
and stats.

``open_profile_store(url)`` picks the implementation by scheme: Redis (one server or a cluster)
or ``memory://`` (in-process, for unit tests and trials). Every effect of an event is applied
exactly once: a profile by compare-and-set of a record that says which events it holds, per-item
state and stats by per-source offset watermarks.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from models.profile import Profile

STAT_FIELDS = ("events_in", "events_applied", "duplicates", "redelivered", "recommendations_out", "dead_letters",
               "items_upserted", "items_deleted", "requests_answered", "users_forgotten", "profiles_reset")
#: Stats that count deliveries, not events: a redelivered batch adds to them again.
DELIVERY_STATS = ("redelivered",)


class ConflictError(RuntimeError):
    """The profile changed since it was read (another writer); read it again and retry."""


@dataclass
class ClickEffect:
    """What one applied click does to per-item state: popularity (global and in ``scene``), the
    item's click count, a co-click with each of the user's earlier clicks ``previous`` (oldest
    first), and a step from each of them to this item (:func:`transition_weights`)."""

    item_id: str
    scene: Optional[str]
    timestamp: float
    weight: float
    previous: Sequence[str] = ()


@dataclass
class Effects:
    """What a batch does outside the profiles, each part tagged with its event's source
    (``topic:partition``) and offset, so that a store applies it exactly once however often the
    batch runs: ``clicks`` as (source, offset, effect), ``stats`` as (source, offset, name, n),
    ``learn`` as (source, offset, step of the ranker's weights, ``models.learning``)."""

    clicks: list[tuple[str, int, ClickEffect]] = field(default_factory=list)
    stats: list[tuple[str, int, str, int]] = field(default_factory=list)
    learn: list[tuple[str, int, np.ndarray]] = field(default_factory=list)  # steps of the ranker's weights

    def count(self, source: str, offset: int, name: str, n: int = 1) -> None:
        if n:
            self.stats.append((source, offset, name, n))

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, name, n in self.stats:
            out[name] = out.get(name, 0) + n
        return out


@dataclass
class Write:
    """A profile to store if its stored version is still ``expected`` (0: none stored).
    ``forgotten``: keep only what recognises its events (a tombstone that expires);
    ``replace``: the stored record was unreadable and is overwritten."""

    profile: Profile
    expected: int
    forgotten: bool = False
    replace: bool = False


class ProfileStore(abc.ABC):
    """Where user profiles and per-item counters live. All methods are coroutines; implementations
    must be safe to share between the agents of one worker.

    Each user's state is one small record (``streams.stores.codec``), written by compare-and-set;
    it carries which events it has taken in. Per-item state is kept per shard of items, and every
    change to it carries its event's (source, offset): a shard applies offsets past its watermark
    for that source only, so a batch that runs again changes nothing twice."""

    @abc.abstractmethod
    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """Profiles of ``user_ids``: an empty one (version 0) for an unknown user, one keeping only
        ``applied`` (and the stored version) for a forgotten one. An unreadable record gives an
        empty profile with ``reset`` set to the reason."""

    @abc.abstractmethod
    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Store each write whose expected version still holds (one round trip for all); for each,
        True if written (its profile's ``version`` is updated), False if the stored one changed."""

    @abc.abstractmethod
    async def apply(self, effects: Effects) -> None:
        """Apply per-item effects and stats, each (source, offset) at most once, ever."""

    @abc.abstractmethod
    async def published(self, sources: Sequence[str]) -> dict[str, int]:
        """Per source, the last offset of a batch whose effects began to apply (-1 for none; its
        stats' watermark once applied): a batch's lists are published before its effects, so the
        events up to it had their lists out."""

    @abc.abstractmethod
    async def begin(self, batch: dict[str, int]) -> dict[str, int]:
        """Note a batch before its lists go out (``batch``: per source, its last offset) and return
        :meth:`published` for its sources, in one round trip."""

    @abc.abstractmethod
    async def positions(self, sources: Sequence[str]) -> dict[str, tuple[int, dict[str, int]]]:
        """Per source, :meth:`published` and the last batch noted with it by :meth:`begin` ({} for
        none): a batch whose last offset is past the published one may have had its lists out
        without its effects, and is taken again as it was."""

    @abc.abstractmethod
    async def model(self) -> dict[str, float | str]:
        """The ranker's learned state: ``model`` (its id) and, per feature, the sum of the steps
        applied (empty before the first)."""

    @abc.abstractmethod
    async def number_items(self, item_ids: Sequence[str]) -> dict[str, int]:
        """Catalog numbers of ``item_ids``: dense, assigned once per item, never reused."""

    @abc.abstractmethod
    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """For each of ``item_ids``, up to ``n`` items (0: every one kept) most often clicked by the
        same users (decayed in event time), each with its co-click weight over sqrt(clicks of one *
        clicks of the other), best first."""

    @abc.abstractmethod
    async def transitions(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """For each of ``item_ids``, up to ``n`` items most often clicked after it by the same user
        (each step weighted 1 / its gap in the user's clicks, decayed in event time), each with
        that weight over the item's own clicks, best first."""

    async def cooccurring_arrays(self, item_ids: Sequence[str], n: int) -> dict[str, tuple[list[str], np.ndarray]]:
        """:meth:`cooccurring` as each item's partner ids and their weights, in any order (what the
        worker sums; a store may skip building and sorting a pair per partner)."""
        return {a: _columns(row) for a, row in (await self.cooccurring(item_ids, n)).items()}

    async def transitions_arrays(self, item_ids: Sequence[str], n: int) -> dict[str, tuple[list[str], np.ndarray]]:
        """:meth:`transitions` as each item's next items and their weights, in any order."""
        return {a: _columns(row) for a, row in (await self.transitions(item_ids, n)).items()}

    @abc.abstractmethod
    async def item_clicks(self, item_ids: Sequence[str], at: float) -> dict[str, float]:
        """Clicks on each of ``item_ids`` (each weighing 1 at its own time), decayed in event time
        to time ``at`` (co-clicks' half-life); 0 for an item never clicked."""

    @abc.abstractmethod
    async def popular(self, scene: Optional[str], n: int, enough: Optional[int] = None) -> list[tuple[str, float]]:
        """The ``n`` most popular items now: in ``scene``'s own list when it is given and holds
        at least ``enough`` items (default ``n``), else in the list of all clicks."""

    @abc.abstractmethod
    async def popularity(self, item_ids: Sequence[str], scene: Optional[str], enough: int) -> dict[str, float]:
        """Each item's popularity relative to the most popular item's (0 to 1; 0 for an item
        never clicked), in the list :meth:`popular` reads for ``scene`` and ``enough``."""

    async def popular_many(self, scenes: Sequence[Optional[str]], n: int,
                           enough: Optional[int] = None) -> dict[Optional[str], list[tuple[str, float]]]:
        """:meth:`popular` of each of ``scenes`` (a store may read them all in one round trip)."""
        scenes = list(dict.fromkeys(scenes))
        return dict(zip(scenes, await asyncio.gather(*(self.popular(s, n, enough) for s in scenes)), strict=True))

    async def popularity_many(self, items: Mapping[Optional[str], Sequence[str]],
                              enough: int) -> dict[Optional[str], dict[str, float]]:
        """:meth:`popularity` of each scene's ``items`` (a store may read them all in one round trip)."""
        scenes = list(items)
        got = await asyncio.gather(*(self.popularity(items[s], s, enough) for s in scenes))
        return dict(zip(scenes, got, strict=True))

    @abc.abstractmethod
    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        """Register catalog items as (item_id, timestamp, category)."""

    @abc.abstractmethod
    async def remove_items(self, item_ids: Sequence[str]) -> None:
        """Forget deleted or unavailable items in popularity, co-clicks and newest lists."""

    @abc.abstractmethod
    async def newest(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` newest catalog items."""

    @abc.abstractmethod
    async def category_count(self) -> int:
        """How many categories the catalog has."""

    @abc.abstractmethod
    async def catalog_progress(self) -> dict[int, int]:
        """Per catalog partition, the last offset whose items are indexed."""

    @abc.abstractmethod
    async def set_catalog_progress(self, progress: dict[int, int]) -> None:
        """Record indexed catalog offsets (a position never moves back)."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]:
        """The worker counters, summed over shards."""

    async def memory_usage(self, user_id: str) -> int:
        """Bytes that the store spends on ``user_id`` (0 where it cannot tell)."""
        return 0

    async def close(self) -> None:
        """Release connections."""


@functools.lru_cache(maxsize=1 << 18)
def shard_of(key: str, shards: int) -> int:
    """The shard of an item (or of a source's stats): stable across processes and versions
    (remembered: the hot path asks it for every co-clicked partner it reads)."""
    return zlib.crc32(key.encode()) % shards


def _columns(row: Sequence[tuple[str, float]]) -> tuple[list[str], np.ndarray]:
    return [b for b, _ in row], np.array([v for _, v in row], dtype=np.float64)


def normalised_cooccurrence(rows: dict[str, list[tuple[str, float]]], counts: dict[str, float],
                            n: int) -> dict[str, list[tuple[str, float]]]:
    """Co-click counts over sqrt(clicks of a * clicks of b), the best ``n`` per item (all for 0)."""
    out = {}
    get, sqrt = counts.get, math.sqrt
    for a, partners in rows.items():
        ca = get(a, 0.0)
        # (-score, b) pairs sort as the key (-score, b) would, without a call per pair
        neg = [(-(c / sqrt(ca * cb)), b) for b, c in partners if (cb := get(b, 0.0)) > 0] if ca > 0 else []
        neg.sort()
        out[a] = [(b, -v) for v, b in (neg[:n] if n > 0 else neg)]
    return out


def transition_weights(c: ClickEffect) -> list[tuple[str, float]]:
    """(earlier item, 1 / gap) for each distinct earlier click of ``c``: gap 1 for the click just
    before it, 2 for the one before that; an item met twice counts at its nearest place."""
    out: dict[str, float] = {}
    for gap, prev in enumerate(reversed(c.previous), 1):
        if prev != c.item_id and prev not in out:
            out[prev] = 1.0 / gap
    return list(out.items())


def normalised_transitions(rows: dict[str, list[tuple[str, float]]], counts: dict[str, float],
                           n: int) -> dict[str, list[tuple[str, float]]]:
    """Steps a -> b over the clicks of a, the best ``n`` per item."""
    out = {}
    for a, partners in rows.items():
        ca = counts.get(a, 0.0)
        neg = [(-(c / ca), b) for b, c in partners] if ca > 0 else []
        neg.sort()
        out[a] = [(b, -v) for v, b in neg[:n]]
    return out


def decayed_weight(timestamp: float, reference: float, halflife_s: float, weight: float) -> float:
    """Click weight scaled by 2 ** ((t - ref) / halflife): adding these keeps a sum of weights that
    decays over event time without rewriting old entries."""
    return weight * math.pow(2.0, (timestamp - reference) / halflife_s)


@dataclass(frozen=True)
class StoreOptions:
    """Tunables of a profile store (the settings hold them for a worker)."""

    shards: int = 16  # shards of per-item state (and of stats)
    popularity_halflife_s: float = 6 * 3600.0
    cooccur_halflife_s: float = 365 * 86400.0
    cooccur_keep: int = 200  # co-clicked partners kept per item (the strongest, decayed)
    popular_keep: int = 5000  # items kept per shard in each popularity list (the most popular)
    forget_ttl_s: float = 7 * 86400.0  # how long a forgotten user's tombstone recognises redeliveries
    wait_replicas: int = 0  # writes wait for this many replicas (Redis WAIT) before a batch is acked
    newest_keep: int = 10_000
