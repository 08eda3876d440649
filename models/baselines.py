"""Baseline recommenders for evaluation, each seeing the events in order and never the future:
``recommend`` before ``update`` for every event. Seen items are excluded by every system alike."""

from __future__ import annotations

import abc
import heapq
import math
import random
from collections import defaultdict
from typing import Iterable, Sequence


class Baseline(abc.ABC):
    name: str

    @abc.abstractmethod
    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        """Up to ``k`` items, none of them in ``exclude``."""

    @abc.abstractmethod
    def update(self, user: str, item: str, timestamp: float) -> None:
        """Learn from one click."""

    def add_items(self, items: Iterable[str]) -> None:
        """Items that exist (the catalog)."""


class RandomBaseline(Baseline):
    """Uniform over the catalog's items not excluded."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.items: list[str] = []

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        out: list[str] = []
        tries = 0
        chosen: set[str] = set()
        while len(out) < k and tries < 20 * k:
            tries += 1
            i = self.items[self.rng.randrange(len(self.items))]
            if i not in exclude and i not in chosen:
                chosen.add(i)
                out.append(i)
        if len(out) < k:  # nearly everything excluded: sample from what is left
            rest = [i for i in self.items if i not in exclude and i not in chosen]
            out += self.rng.sample(rest, min(k - len(out), len(rest)))
        return out

    def update(self, user: str, item: str, timestamp: float) -> None:
        pass


class PopularityBaseline(Baseline):
    """Most clicked so far; with ``halflife_s``, clicks decay with event time."""

    def __init__(self, halflife_s: float | None = None) -> None:
        self.halflife = halflife_s
        self.name = "recent_popularity" if halflife_s else "popularity"
        self.score: dict[str, float] = defaultdict(float)
        self.ref: float | None = None

    def update(self, user: str, item: str, timestamp: float) -> None:
        w = 1.0
        if self.halflife:
            if self.ref is None:
                self.ref = timestamp
            e = (timestamp - self.ref) / self.halflife
            if e > 500:  # rescale to stay in float range
                for key in self.score:
                    self.score[key] *= 2.0 ** -e
                self.ref, e = timestamp, 0.0
            w = 2.0 ** e
        self.score[item] += w

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        best = heapq.nsmallest(k + len(exclude), self.score.items(), key=lambda kv: (-kv[1], kv[0]))
        return [i for i, _ in best if i not in exclude][:k]


class ItemKnnBaseline(Baseline):
    """Item-to-item co-occurrence: items clicked by the same users, scored from the user's
    ``recent`` last clicks with cosine-normalised counts."""

    name = "item_knn"

    def __init__(self, recent: int = 20, max_history: int = 200) -> None:
        self.recent, self.max_history = recent, max_history
        self.co: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.count: dict[str, int] = defaultdict(int)
        self.history: dict[str, list[str]] = defaultdict(list)
        self.fallback = PopularityBaseline()

    def update(self, user: str, item: str, timestamp: float) -> None:
        hist = self.history[user]
        for other in hist[-self.max_history:]:
            if other != item:
                self.co[item][other] += 1.0
                self.co[other][item] += 1.0
        self.count[item] += 1
        hist.append(item)
        self.fallback.update(user, item, timestamp)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        scores: dict[str, float] = defaultdict(float)
        for src in self.history.get(user, [])[-self.recent:]:
            for dst, c in self.co[src].items():
                if dst not in exclude:
                    scores[dst] += c / math.sqrt(self.count[src] * self.count[dst])
        ranked = [i for i, _ in heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))]
        if len(ranked) < k:
            ranked += [i for i in self.fallback.recommend(user, k, exclude | set(ranked))][: k - len(ranked)]
        return ranked


class OracleBaseline(Baseline):
    """Shown the answer: for testing the scorer only."""

    name = "oracle"

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = iter(answers)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        return [next(self.answers)]

    def update(self, user: str, item: str, timestamp: float) -> None:
        pass
