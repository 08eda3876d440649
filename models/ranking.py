"""Ranking candidates into a list: cosine similarity, interest, scene, diversity and a reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

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


def rank(profile: Profile, candidates: Iterable[Candidate], k: int, scene: Optional[str], categories: int,
         params: ModelParams, exclude: frozenset[str] | set[str] = frozenset(),
         only_categories: Sequence[str] = (), popularity: Mapping[str, float] | None = None,
         cooccur: Mapping[str, float] | None = None, cooccur_with: Mapping[str, str] | None = None) -> list[Ranked]:
    """Order ``candidates`` for ``profile`` and keep ``k``.

    score = cosine(user, item) + w_interest * (P(category) - uniform) + w_popularity * popularity
    + w_cooccur * co-clicks + w_scene_item * [offered in scene], then a greedy diversity step
    subtracts ``diversity`` per item of the same category already chosen. ``popularity``: item id
    -> decayed popularity relative to the most popular item; ``cooccur``: item id -> how often it
    was clicked with the user's recent clicks, relative to the best (both 0 to 1; absent: 0);
    ``cooccur_with``: item id -> the title of the click it goes with, for the reason. Seen and
    excluded items never come back.
    """
    popularity = popularity or {}
    cooccur = cooccur or {}
    cooccur_with = cooccur_with or {}
    dist = interest_distribution(profile, max(categories, 1), params)
    uniform = 1.0 / max(categories, 1)
    pool: list[tuple[float, Candidate]] = []
    seen_ids: set[str] = set()
    for c in candidates:
        if c.no in profile.seen or c.item_id in exclude or c.item_id in seen_ids:
            continue
        if only_categories and c.category not in only_categories:
            continue
        seen_ids.add(c.item_id)
        p = dist.get(c.category, dist["*"]) if c.category else uniform
        s = (c.similarity + params.w_interest * (p - uniform) + params.w_popularity * popularity.get(c.item_id, 0.0)
             + params.w_cooccur * cooccur.get(c.item_id, 0.0))
        if scene and c.scenes and scene in c.scenes:
            s += params.w_scene_item
        pool.append((s, c))
    chosen: list[tuple[float, Candidate]] = []
    per_category: dict[str, int] = {}
    pool.sort(key=lambda sc: (-sc[0], sc[1].item_id))
    while pool and len(chosen) < k:
        best_i, best_s = 0, -np.inf
        for i, (s, c) in enumerate(pool):
            adj = s - params.diversity * per_category.get(c.category, 0)
            if adj > best_s:
                best_i, best_s = i, adj
            if s < best_s:  # pool is sorted by s: nothing later can win
                break
        s, c = pool.pop(best_i)
        per_category[c.category] = per_category.get(c.category, 0) + 1
        chosen.append((best_s, c))
    return [Ranked(c.item_id, round(float(s), 6),
                   explain(profile, c, dist, params, popularity.get(c.item_id, 0.0),
                           cooccur_with.get(c.item_id) if cooccur.get(c.item_id, 0.0) >= 0.5 else None),
                   c.title, c.category) for s, c in chosen]


def explain(profile: Profile, item: Candidate, dist: dict[str, float], params: ModelParams,
            popularity: float = 0.0, clicked_with: Optional[str] = None) -> str:
    """A short reason: the recent click it is often clicked with (``clicked_with``), else the
    recent click or query it is closest to, else the interest it matches, else its popularity."""
    if clicked_with:
        return f"often clicked with {_clip(clicked_with)}"
    if item.vector is not None and profile.explainers:
        sims = [float(np.dot(e.vector, item.vector)) for e in profile.explainers]
        best = int(np.argmax(sims))
        if sims[best] >= params.reason_min_similarity:
            e = profile.explainers[best]
            if e.kind == "query":
                return f"matches your search '{_clip(e.label)}'"
            return f"similar to {_clip(e.label)} you clicked"
    if item.category and item.category in profile.interest:
        return f"matches your interest in {item.category} ({dist.get(item.category, 0.0):.0%})"
    if popularity >= 0.5:
        return "popular now, close to your taste"
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
