"""Ranking candidates into a list: features of each candidate scored by the (learned) weights,
diversity, and a reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from models.learning import F, Impression, default_weights, rank_feature, signal_mask, squash
from models.params import ModelParams
from models.profile import Profile, interest_distribution


@dataclass
class Candidate:
    """An item returned by the item index, with its cosine similarity to the query vector."""

    item_id: str
    similarity: float
    vector: Optional[np.ndarray] = None
    title: str = ""
    category: str = ""
    scenes: Sequence[str] = field(default_factory=tuple)
    available: bool = True
    no: int = -1  # catalog number (what a profile's seen set holds)


@dataclass
class Ranked:
    item_id: str
    score: float
    reason: str
    title: str
    category: str


@dataclass
class Signals:
    """Behaviour signals of one list's candidates, by item id (absent: 0): ``cooccur`` and
    ``transitions`` are raw sums over the user's recent clicks (``*_from``: the title of the click
    that gives the most), ``popularity`` is relative to the most popular item (0 to 1),
    ``item_clicks`` the item's clicks decayed in event time."""

    cooccur: Mapping[str, float] = field(default_factory=dict)
    cooccur_from: Mapping[str, str] = field(default_factory=dict)
    transitions: Mapping[str, float] = field(default_factory=dict)
    transitions_from: Mapping[str, str] = field(default_factory=dict)
    popularity: Mapping[str, float] = field(default_factory=dict)
    item_clicks: Mapping[str, float] = field(default_factory=dict)  # decayed clicks on each item


class RankedList(list):
    """The ranked items, and the impression to learn from: the best candidates with features."""

    impression: Impression = Impression()


def _values(scores: Mapping[str, float], ids: Sequence[str]) -> np.ndarray:
    """``scores`` of ``ids`` (0 where absent); a mapping with ``many(ids)`` answers in one call."""
    many = getattr(scores, "many", None)
    return many(ids) if many is not None else np.array([scores.get(i, 0.0) for i in ids], dtype=np.float64)


def features(profile: Profile, pool: Sequence[Candidate], scene: Optional[str], categories: int,
             params: ModelParams, signals: Signals) -> np.ndarray:
    """The feature matrix (len(pool), F) of ``models.learning.FEATURES``, each in [-1, 1]."""
    dist = interest_distribution(profile, max(categories, 1), params)
    uniform = 1.0 / max(categories, 1)
    n = len(pool)
    X = np.zeros((n, F))
    if not n:
        return X
    ids = [c.item_id for c in pool]
    text = np.array([c.similarity for c in pool])
    co, tr = _values(signals.cooccur, ids), _values(signals.transitions, ids)
    pop = np.array([signals.popularity.get(i, 0.0) for i in ids])
    X[:, 0] = np.clip(text, -1.0, 1.0)
    X[:, 1] = squash(co)
    X[:, 2] = squash(tr)
    X[:, 3] = np.clip(pop, 0.0, 1.0)
    X[:, 4] = [(dist.get(c.category, dist["*"]) if c.category else uniform) - uniform for c in pool]
    X[:, 5] = [1.0 if scene and c.scenes and scene in c.scenes else 0.0 for c in pool]
    X[:, 6] = rank_feature(text + 2.0)  # every candidate has a text rank
    X[:, 7] = rank_feature(co)
    X[:, 8] = rank_feature(tr)
    X[:, 9] = rank_feature(pop)
    X[:, 10] = X[:, 0] / (1.0 + np.array([signals.item_clicks.get(i, 0.0) for i in ids]))
    return X


def rank(profile: Profile, candidates: Iterable[Candidate], k: int, scene: Optional[str], categories: int,
         params: ModelParams, exclude: frozenset[str] | set[str] = frozenset(),
         only_categories: Sequence[str] = (), signals: Optional[Signals] = None,
         weights: Optional[np.ndarray] = None) -> RankedList:
    """Order ``candidates`` for ``profile`` and keep ``k``.

    score = weights . features (``models.learning``: cosine to the user, co-clicks and steps from
    the user's recent clicks, popularity, interest in the item's category, the scene, and each
    signal's rank among the candidates); ``weights`` default to ``params``' defaults. A greedy
    diversity step then subtracts ``diversity`` per item of the same category already chosen.
    Seen and excluded items never come back. The reason of each item comes from the signal that
    adds most to its score.
    """
    signals = signals or Signals()
    w = default_weights(params) * signal_mask(params) if weights is None else weights
    dist = interest_distribution(profile, max(categories, 1), params)
    pool: list[Candidate] = []
    seen_ids: set[str] = set()
    for c in candidates:
        if c.no in profile.seen or c.item_id in exclude or c.item_id in seen_ids:
            continue
        if only_categories and c.category not in only_categories:
            continue
        seen_ids.add(c.item_id)
        pool.append(c)
    X = features(profile, pool, scene, categories, params, signals)
    scores = (X @ w).tolist() if len(pool) else []
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], pool[i].item_id))
    out = RankedList()
    top = order[: params.impression_size]
    out.impression = Impression.of([pool[i].no for i in top], X[top]) if top else Impression()
    remaining = [(scores[i], i) for i in order]
    per_category: dict[str, int] = {}
    chosen: list[tuple[int, float]] = []
    while remaining and len(chosen) < k:
        best_j, best_s = 0, -np.inf
        for j, (s, i) in enumerate(remaining):
            adj = s - params.diversity * per_category.get(pool[i].category, 0)
            if adj > best_s:
                best_j, best_s = j, adj
            if s < best_s:  # sorted by s: nothing later can win
                break
        _, i = remaining.pop(best_j)
        per_category[pool[i].category] = per_category.get(pool[i].category, 0) + 1
        chosen.append((i, best_s))
    if chosen:
        for (i, s), groups in zip(chosen, _groups_by_contribution(X[[i for i, _ in chosen]] * w)):
            c = pool[i]
            out.append(Ranked(c.item_id, round(s, 6), explain(profile, c, dist, params, signals=signals,
                                                              groups=groups), c.title, c.category))
    return out


_GROUPS = {"text": (0, 6, 10), "cooccur": (1, 7), "transitions": (2, 8), "popularity": (3, 9), "interest": (4, 5)}
_GROUP_NAMES = list(_GROUPS)


def _groups_by_contribution(contributions: np.ndarray) -> list[list[str]]:
    """For each row of ``contributions`` (weight times feature), the signal groups by what they add,
    most first (ties in ``_GROUPS`` order): each group's sum is added left to right, as ``sum`` would."""
    sums = np.empty((len(contributions), len(_GROUPS)))
    for g, cols in enumerate(_GROUPS.values()):
        acc = contributions[:, cols[0]]
        for j in cols[1:]:
            acc = acc + contributions[:, j]
        sums[:, g] = acc
    return [[_GROUP_NAMES[g] for g in row] for row in np.argsort(-sums, axis=1, kind="stable").tolist()]


def explain(profile: Profile, item: Candidate, dist: dict[str, float], params: ModelParams,
            signals: Optional[Signals] = None, groups: Sequence[str] = ("text",)) -> str:
    """A short reason from the signal that adds most to the item's score (``groups``: the signal
    groups, most first, from :func:`_groups_by_contribution`): the recent click it is often clicked
    with or after, the recent click or query it is closest to, the interest it matches, or its
    popularity."""
    signals = signals or Signals()
    for group in groups:
        if group == "transitions" and item.item_id in signals.transitions_from:
            return f"often clicked after {_clip(signals.transitions_from[item.item_id])}"
        if group == "cooccur" and item.item_id in signals.cooccur_from:
            return f"often clicked with {_clip(signals.cooccur_from[item.item_id])}"
        if group == "popularity" and signals.popularity.get(item.item_id, 0.0) > 0:
            return "popular now, close to your taste"
        if group == "interest" and item.category and item.category in profile.interest:
            return f"matches your interest in {item.category} ({dist.get(item.category, 0.0):.0%})"
        if group == "text" and item.vector is not None and profile.explainers:
            sims = [float(np.dot(e.vector, item.vector)) for e in profile.explainers]
            best = int(np.argmax(sims))
            if sims[best] >= params.reason_min_similarity:
                e = profile.explainers[best]
                if e.kind == "query":
                    return f"matches your search '{_clip(e.label)}'"
                return f"similar to {_clip(e.label)} you clicked"
    if item.category and item.category in profile.interest:
        return f"matches your interest in {item.category} ({dist.get(item.category, 0.0):.0%})"
    return "close to your recent activity"


def cold_start(popular: Sequence[Candidate], newest: Sequence[Candidate], k: int,
               exclude: set[str] | frozenset[str] = frozenset(), only_categories: Sequence[str] = ()) -> list[Ranked]:
    """The list for a user with no profile: most popular first, then the newest items."""
    out: list[Ranked] = []
    taken: set[str] = set()
    for reason, pool in (("popular now", popular), ("new in the catalog", newest)):
        for c in pool:
            if len(out) >= k:
                return out
            if c.item_id in taken or c.item_id in exclude:
                continue
            if only_categories and c.category not in only_categories:
                continue
            taken.add(c.item_id)
            out.append(Ranked(c.item_id, round(float(c.similarity), 6), reason, c.title, c.category))
    return out


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
