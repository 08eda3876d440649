"""Ranking candidates into a list: features of each candidate scored by the (learned) weights,
diversity, and a reason."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from models.learning import F, Impression, default_weights, signal_mask, squash
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


@dataclass
class Job:
    """One list to rank: its user's profile, the candidates, and what the list is limited to."""

    profile: Profile
    candidates: Iterable[Candidate]
    k: int
    scene: Optional[str] = None
    exclude: frozenset[str] | set[str] = frozenset()
    only_categories: Sequence[str] = ()
    signals: Signals = field(default_factory=Signals)
    vector: Optional[np.ndarray] = None  # the list's query vector: candidates' cosines taken again from it


def cosines(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each row's cosine to ``query`` (unit vectors), summed in float64 row by row and rounded to
    float32: the same value for an item and a query whatever else is computed beside it. An
    index's float32 scores differ in their last bits with the shape of the search call (how many
    queries, which items a filter leaves), which would let the batching reorder near-ties."""
    rows = np.einsum("ij,j->i", np.asarray(vectors, dtype=np.float64), np.asarray(query, dtype=np.float64))
    return rows.astype(np.float32).astype(np.float64)


def segment_ranks(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """:func:`models.learning.rank_feature` within each segment (``seg``: each value's segment,
    ascending) at once: 1 / (1 + how many greater values its segment holds); 0 where value <= 0."""
    out = np.zeros(len(values))
    pos = np.flatnonzero(values > 0)
    if not len(pos):
        return out
    v, s = values[pos], seg[pos]
    order = np.lexsort((-v, s))
    sv, ss = v[order], s[order]
    n = len(order)
    at = np.arange(n)
    run = np.ones(n, dtype=bool)  # a new run of equal values (in a segment) starts here
    run[1:] = (ss[1:] != ss[:-1]) | (sv[1:] != sv[:-1])
    first = np.maximum.accumulate(np.where(run, at, 0))  # where each value's run starts
    seg_start = np.ones(n, dtype=bool)
    seg_start[1:] = ss[1:] != ss[:-1]
    base = np.maximum.accumulate(np.where(seg_start, at, 0))
    ranked = np.empty(n)
    ranked[order] = 1.0 / (1.0 + (first - base))
    out[pos] = ranked
    return out


def features(jobs: Sequence[Job], pools: Sequence[Sequence[Candidate]], dists: Sequence[dict[str, float]],
             categories: int) -> np.ndarray:
    """The feature matrix of every pool, one after another, (total candidates, F) of
    ``models.learning.FEATURES``, each in [-1, 1]; rank features are taken within each pool."""
    uniform = 1.0 / max(categories, 1)
    n = sum(len(pool) for pool in pools)
    X = np.zeros((n, F))
    if not n:
        return X
    seg = np.repeat(np.arange(len(pools)), [len(pool) for pool in pools])
    text = np.concatenate([_similarities(job.vector, pool) for job, pool in zip(jobs, pools)])
    co, tr, pop, clicks, interest, scene = [], [], [], [], [], []
    for job, pool, dist in zip(jobs, pools, dists):
        if not pool:
            continue
        sig = job.signals
        ids = [c.item_id for c in pool]
        co.append(_values(sig.cooccur, ids))
        tr.append(_values(sig.transitions, ids))
        popularity, item_clicks = sig.popularity, sig.item_clicks
        pop.extend([popularity.get(i, 0.0) for i in ids])
        clicks.extend([item_clicks.get(i, 0.0) for i in ids])
        other = dist["*"]
        interest.extend([(dist.get(c.category, other) if c.category else uniform) - uniform for c in pool])
        s = job.scene
        scene.extend([1.0 if s and c.scenes and s in c.scenes else 0.0 for c in pool])
    co_a, tr_a, pop_a = np.concatenate(co), np.concatenate(tr), np.array(pop, dtype=np.float64)
    X[:, 0] = np.clip(text, -1.0, 1.0)
    X[:, 1] = squash(co_a)
    X[:, 2] = squash(tr_a)
    X[:, 3] = np.clip(pop_a, 0.0, 1.0)
    X[:, 4] = interest
    X[:, 5] = scene
    X[:, 6] = segment_ranks(text + 2.0, seg)  # every candidate has a text rank
    X[:, 7] = segment_ranks(co_a, seg)
    X[:, 8] = segment_ranks(tr_a, seg)
    X[:, 9] = segment_ranks(pop_a, seg)
    X[:, 10] = X[:, 0] / (1.0 + np.array(clicks, dtype=np.float64))
    return X


def _similarities(vector: Optional[np.ndarray], pool: Sequence[Candidate]) -> np.ndarray:
    """The candidates' cosines: taken again from their vectors where the list's vector is known."""
    sims = np.array([c.similarity for c in pool], dtype=np.float64)
    if vector is not None:
        has = [j for j, c in enumerate(pool) if c.vector is not None]
        if has:
            sims[has] = cosines(vector, np.stack([pool[j].vector for j in has]))
    return sims


def rank(profile: Profile, candidates: Iterable[Candidate], k: int, scene: Optional[str], categories: int,
         params: ModelParams, exclude: frozenset[str] | set[str] = frozenset(),
         only_categories: Sequence[str] = (), signals: Optional[Signals] = None,
         weights: Optional[np.ndarray] = None) -> RankedList:
    """Order ``candidates`` for ``profile`` and keep ``k``: :func:`rank_many` of one list."""
    job = Job(profile, candidates, k, scene, exclude, only_categories, signals or Signals())
    return rank_many([job], categories, params, weights)[0]


def rank_many(jobs: Sequence[Job], categories: int, params: ModelParams,
              weights: Optional[np.ndarray] = None) -> list[RankedList]:
    """Order each job's candidates for its profile and keep its ``k``, every list's features and
    scores computed at once.

    score = weights . features (``models.learning``: cosine to the user, co-clicks and steps from
    the user's recent clicks, popularity, interest in the item's category, the scene, and each
    signal's rank among the list's candidates); ``weights`` default to ``params``' defaults. A
    greedy diversity step then subtracts ``diversity`` per item of the same category already
    chosen. Seen and excluded items never come back. The reason of each item comes from the
    signal that adds most to its score.
    """
    w = default_weights(params) * signal_mask(params) if weights is None else weights
    n_cat = max(categories, 1)
    dists = [interest_distribution(job.profile, n_cat, params) for job in jobs]
    pools: list[list[Candidate]] = []
    for job in jobs:
        pool: list[Candidate] = []
        seen, exclude, only = job.profile.seen, job.exclude, job.only_categories
        taken: set[str] = set()
        for c in job.candidates:
            if c.no in seen or c.item_id in exclude or c.item_id in taken:
                continue
            if only and c.category not in only:
                continue
            taken.add(c.item_id)
            pool.append(c)
        pools.append(pool)
    X = features(jobs, pools, dists, categories)
    scores = X @ w if len(X) else np.zeros(0)
    ids = np.array([c.item_id for pool in pools for c in pool]) if len(X) else np.zeros(0, dtype=str)
    seg = np.repeat(np.arange(len(pools)), [len(pool) for pool in pools])
    order = np.lexsort((ids, -scores, seg))  # each pool's candidates by score, then item id
    Q = np.clip(np.round(X * 127.0), -127, 127).astype(np.int8)  # as Impression.of quantises
    score_list = scores.tolist()
    outs: list[RankedList] = []
    picks: list[tuple[int, int, float]] = []  # (job, row, adjusted score) of every item chosen
    start = 0
    for j, (job, pool) in enumerate(zip(jobs, pools)):
        out = RankedList()
        outs.append(out)
        rows = order[start:start + len(pool)].tolist()
        top = rows[: params.impression_size]
        out.impression = Impression([pool[r - start].no for r in top], Q[top]) if top else Impression()
        remaining = [(score_list[r], r) for r in rows]
        per_category: dict[str, int] = {}
        chosen = 0
        while remaining and chosen < job.k:
            best_j, best_s = 0, -np.inf
            for i, (s, r) in enumerate(remaining):
                adj = s - params.diversity * per_category.get(pool[r - start].category, 0)
                if adj > best_s:
                    best_j, best_s = i, adj
                if s < best_s:  # sorted by s: nothing later can win
                    break
            _, r = remaining.pop(best_j)
            cat = pool[r - start].category
            per_category[cat] = per_category.get(cat, 0) + 1
            picks.append((j, r, best_s))
            chosen += 1
        start += len(pool)
    if picks:
        offsets = np.cumsum([0] + [len(pool) for pool in pools]).tolist()
        groups = _groups_by_contribution(X[[r for _, r, _ in picks]] * w)
        for (j, r, s), g in zip(picks, groups):
            job, c = jobs[j], pools[j][r - offsets[j]]
            outs[j].append(Ranked(c.item_id, round(s, 6), explain(job.profile, c, dists[j], params,
                                                                  signals=job.signals, groups=g),
                                  c.title, c.category))
    return outs


_GROUPS = {"text": (0, 6, 10), "cooccur": (1, 7), "transitions": (2, 8), "popularity": (3, 9), "interest": (4, 5)}
_GROUP_NAMES = list(_GROUPS)
_PLACES = len(_GROUPS) ** np.arange(len(_GROUPS))
_ORDERS = {int(np.dot(order, _PLACES)): tuple(_GROUP_NAMES[g] for g in order)
           for order in itertools.permutations(range(len(_GROUPS)))}


def _groups_by_contribution(contributions: np.ndarray) -> list[tuple[str, ...]]:
    """For each row of ``contributions`` (weight times feature), the signal groups by what they add,
    most first (ties in ``_GROUPS`` order): each group's sum is added left to right, as ``sum`` would."""
    sums = np.empty((len(contributions), len(_GROUPS)))
    for g, cols in enumerate(_GROUPS.values()):
        acc = contributions[:, cols[0]]
        for j in cols[1:]:
            acc = acc + contributions[:, j]
        sums[:, g] = acc
    order = np.argsort(-sums, axis=1, kind="stable")
    keys = order @ _PLACES  # each order as one number, its names looked up once
    return [_ORDERS[key] for key in keys.tolist()]


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
            best = max(range(len(sims)), key=sims.__getitem__)  # the first of the best, as argmax
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
