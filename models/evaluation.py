"""Test-then-train scoring of ranked lists: HR@K, NDCG@K, MRR and catalog coverage, overall and
by the user's history length when the list was made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

SEGMENTS = (("2-5", 2, 5), ("6+", 6, None))  # earlier events of the user, inclusive bounds


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
    _segments: dict = field(default_factory=lambda: {name: _Sums() for name, _, _ in SEGMENTS})
    _recommended: set = field(default_factory=set)
    curve: list = field(default_factory=list)  # (events scored, running HR) every 100 events

    def score(self, items: Sequence[str], target: str, history: int) -> int | None:
        """Score one list against the item the user clicked next; returns its rank or None.
        MRR counts the target's rank within the first K."""
        rank = rank_of(items, target, self.k)
        self._all.add(rank)
        seg = segment_of(history)
        if seg is not None:
            self._segments[seg].add(rank)
        self._recommended.update(items[: self.k])
        if self._all.n % 100 == 0:
            self.curve.append((self._all.n, self._all.hits / self._all.n))
        return rank

    def result(self) -> dict:
        out = self._all.metrics()
        out["coverage"] = len(self._recommended) / max(self.catalog_size, 1)
        out["segments"] = {name: s.metrics() for name, s in self._segments.items()}
        return out


def evaluate_stream(events: Sequence[dict], systems: Sequence, k: int, catalog: Sequence[str]) -> dict[str, dict]:
    """Run ``systems`` (objects with ``recommend(user, k, exclude)`` and ``update(user, item, t)``)
    over ``events`` in order, test-then-train: after every event of a user each system makes
    that user's list (seen items excluded); the user's next click is scored against it.
    Queries make lists but teach the systems nothing. Returns each system's metrics."""
    for system in systems:
        system.add_items(catalog)
    scorers = {s.name: Scorer(k, len(catalog)) for s in systems}
    last: dict[str, dict[str, list[str]]] = {}
    seen: dict[str, set[str]] = {}
    history: dict[str, int] = {}
    for e in events:
        user = e["user_id"]
        if e["type"] == "click":
            if user in last:
                for s in systems:
                    scorers[s.name].score(last[user][s.name], e["item_id"], history[user])
            for s in systems:
                s.update(user, e["item_id"], e["timestamp"])
            seen.setdefault(user, set()).add(e["item_id"])
        history[user] = history.get(user, 0) + 1
        exclude = seen.get(user, set())
        last[user] = {s.name: s.recommend(user, k, exclude) for s in systems}
    return {name: sc.result() for name, sc in scorers.items()}
