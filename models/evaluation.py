"""Test-then-train scoring of ranked lists: HR@K, NDCG@K, MRR and catalog coverage, overall, by the
user's history length when the list was made, and for clicks on cold items."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import time
from typing import Callable, Mapping, Sequence

SEGMENTS = (("2-5", 2, 5), ("6+", 6, None))  # earlier events of the user, inclusive bounds
COLD_ITEMS = "cold_items"  # the clicked item had fewer than COLD_CLICKS earlier clicks (by any user)
COLD_CLICKS = 5
SEGMENT_NAMES = tuple(name for name, _, _ in SEGMENTS) + (COLD_ITEMS,)  # the keys of ``segments``


def segment_of(history: int) -> str | None:
    """The history segment of a user with ``history`` earlier events (None below 2)."""
    for name, lo, hi in SEGMENTS:
        if history >= lo and (hi is None or history <= hi):
            return name
    return None


def rank_of(items: Sequence[str], target: str, k: int) -> int | None:
    """1-based rank of ``target`` in the first ``k`` of ``items``; None when absent."""
    for i, item in enumerate(items[:k]):
        if item == target:
            return i + 1
    return None


@dataclass
class _Sums:
    n: int = 0
    hits: int = 0
    ndcg: float = 0.0
    rr: float = 0.0

    def add(self, rank: int | None) -> None:
        self.n += 1
        if rank is not None:
            self.hits += 1
            self.ndcg += 1.0 / math.log2(rank + 1)
            self.rr += 1.0 / rank

    def metrics(self) -> dict:
        n = max(self.n, 1)
        return {"hr": self.hits / n, "ndcg": self.ndcg / n, "mrr": self.rr / n, "events_scored": self.n}


@dataclass
class Scorer:
    """Accumulates one system's scores. Call :meth:`score` for every click that has a list to
    score (the list made after the user's previous event)."""

    k: int
    catalog_size: int
    _all: _Sums = field(default_factory=_Sums)
    _segments: dict = field(default_factory=lambda: {name: _Sums() for name in SEGMENT_NAMES})
    _recommended: set = field(default_factory=set)
    _seg_recommended: dict = field(default_factory=lambda: {name: set() for name in SEGMENT_NAMES})
    hits: bytearray = field(default_factory=bytearray)  # 1 per scored click that hit, in stream order

    def score(self, items: Sequence[str], target: str, history: int, item_clicks: int | None = None) -> int | None:
        """Score one list against the item the user clicked next; returns its rank or None.
        MRR counts the target's rank within the first K. ``item_clicks``: the target's earlier
        clicks in the stream (by any user), for the cold-items segment (None: not counted there)."""
        rank = rank_of(items, target, self.k)
        self._all.add(rank)
        segments = [segment_of(history)]
        if item_clicks is not None and item_clicks < COLD_CLICKS:
            segments.append(COLD_ITEMS)
        for seg in segments:
            if seg is not None:
                self._segments[seg].add(rank)
                self._seg_recommended[seg].update(items[: self.k])
        self._recommended.update(items[: self.k])
        self.hits.append(rank is not None)
        return rank

    def result(self) -> dict:
        out = self._all.metrics()
        out["coverage"] = len(self._recommended) / max(self.catalog_size, 1)
        out["segments"] = {name: {**s.metrics(), "coverage": len(self._seg_recommended[name]) / max(self.catalog_size, 1)}
                           for name, s in self._segments.items()}
        return out


def windowed_hit_rate(hits: Sequence[int], window: int) -> list[tuple[int, float]]:
    """(scored clicks so far, HR over the last ``window`` of them), one point per ``window // 4``."""
    step = max(window // 4, 1)
    out = []
    total = 0
    prefix = [0]
    for h in hits:
        total += h
        prefix.append(total)
    for end in range(window, len(hits) + 1, step):
        out.append((end, (prefix[end] - prefix[end - window]) / window))
    return out


class StreamResult(dict):
    """Metrics by system name, with each system's per-click ``hits`` and ``seconds`` spent."""

    def __init__(self, metrics: dict[str, dict], hits: dict[str, bytearray], seconds: dict[str, float]) -> None:
        super().__init__(metrics)
        self.hits, self.seconds = hits, seconds


def evaluate_stream(events: Sequence[dict], systems: Sequence, k: int, catalog: Sequence[str],
                    recorded: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                    progress: Callable[[int], None] | None = None) -> StreamResult:
    """Run ``systems`` (objects with ``name``, ``add_items(catalog)``, ``recommend(user, k, exclude)``
    and ``update(user, item, t)``) over ``events`` in order, test-then-train: after every event of
    a user each system makes that user's list (seen items excluded); the user's next click is
    scored against it. Queries make lists but teach the systems nothing. Besides the history
    segments, a click counts in ``cold_items`` when its item had fewer than ``COLD_CLICKS`` earlier
    clicks in ``events`` (by any user, scored or not).

    ``recorded`` adds systems whose lists were made elsewhere: ``{name: {event_id: items}}``, the
    list made after each event (a missing list scores as empty). ``progress(n)`` is called every
    1,000 events."""
    recorded = recorded or {}
    seconds = {s.name: 0.0 for s in systems}
    for system in systems:
        t = time.perf_counter()
        system.add_items(catalog)
        seconds[system.name] += time.perf_counter() - t
    names = [s.name for s in systems] + list(recorded)
    scorers = {name: Scorer(k, len(catalog)) for name in names}
    last: dict[str, dict[str, Sequence[str]]] = {}
    seen: dict[str, set[str]] = {}
    history: dict[str, int] = {}
    item_clicks: dict[str, int] = {}  # clicks on each item so far
    for n, e in enumerate(events):
        user = e["user_id"]
        if e["type"] == "click":
            earlier = item_clicks.get(e["item_id"], 0)
            item_clicks[e["item_id"]] = earlier + 1
            if user in last:
                for name in names:
                    scorers[name].score(last[user][name], e["item_id"], history[user], earlier)
            for s in systems:
                t = time.perf_counter()
                s.update(user, e["item_id"], e["timestamp"])
                seconds[s.name] += time.perf_counter() - t
            seen.setdefault(user, set()).add(e["item_id"])
        history[user] = history.get(user, 0) + 1
        exclude = seen.get(user, set())
        lists: dict[str, Sequence[str]] = {}
        for s in systems:
            t = time.perf_counter()
            lists[s.name] = s.recommend(user, k, exclude)
            seconds[s.name] += time.perf_counter() - t
        for name, by_event in recorded.items():
            lists[name] = by_event.get(e["event_id"], ())
        last[user] = lists
        if progress and (n + 1) % 1000 == 0:
            progress(1000)
    return StreamResult({name: sc.result() for name, sc in scorers.items()},
                        {name: sc.hits for name, sc in scorers.items()}, seconds)
