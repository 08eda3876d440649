"""A user's profile and its online updates from clicks and queries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from models.params import ModelParams


@dataclass
class Explainer:
    """A recent click or query kept with its vector, to explain recommendations."""

    kind: str  # "click" or "query"
    label: str  # item title or query text
    ref: str  # item id or event id
    vector: np.ndarray


@dataclass
class Profile:
    """Everything streamrec knows about one user.

    ``long``/``short`` are unit vectors in the encoder's space (``None`` before any event);
    ``scenes`` maps a scene to its own vector; ``intent`` is the last query, weighted by
    ``intent_strength``; ``interest`` holds decayed logits per category,
    whose softmax is the interest distribution.
    """

    user_id: str
    version: int = 0
    long: Optional[np.ndarray] = None
    short: Optional[np.ndarray] = None
    scenes: dict[str, np.ndarray] = field(default_factory=dict)
    intent: Optional[np.ndarray] = None  # the last query's vector
    intent_strength: float = 0.0  # 1 right after a query, decaying with every later click
    interest: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    explainers: list[Explainer] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    clicks: int = 0
    queries: int = 0
    last_time: float = 0.0

    @property
    def is_cold(self) -> bool:
        return self.long is None and self.short is None


def _ema(old: Optional[np.ndarray], new: np.ndarray, alpha: float) -> np.ndarray:
    if old is None:
        mixed = new.astype(np.float32, copy=True)
    else:
        mixed = (1.0 - alpha) * old + alpha * new
    norm = float(np.linalg.norm(mixed))
    return (mixed / norm).astype(np.float32) if norm > 0 else mixed.astype(np.float32)


def _rate(alpha: float, weight: float) -> float:
    """The EMA rate of feedback of strength ``weight``: weight 2 counts as two steps of ``alpha``."""
    return 1.0 - (1.0 - alpha) ** weight


def click_strength(weight: float, dwell_s: Optional[float], params: ModelParams) -> float:
    """The feedback strength of a click: its weight, scaled down for short dwell times."""
    strength = weight * params.click_weight
    if dwell_s is not None:
        strength *= min(1.0, max(0.1, dwell_s / params.dwell_full_s))
    return strength


def apply_click(profile: Profile, item_id: str, item_vector: np.ndarray, title: str, category: str,
                scene: Optional[str], strength: float, event_id: str, timestamp: float,
                params: ModelParams) -> None:
    """Move the profile toward a clicked item (in place)."""
    profile.long = _ema(profile.long, item_vector, _rate(params.long_alpha, strength))
    profile.short = _ema(profile.short, item_vector, _rate(params.short_alpha, strength))
    if scene:
        profile.scenes[scene] = _ema(profile.scenes.get(scene), item_vector, _rate(params.scene_alpha, strength))
    if category:
        decay = params.category_decay ** strength
        for c in profile.interest:
            profile.interest[c] *= decay
        profile.interest[category] = profile.interest.get(category, 0.0) + strength
    profile.intent_strength *= params.intent_decay ** strength
    profile.seen.add(item_id)
    profile.clicks += 1
    _remember(profile, {"type": "click", "item_id": item_id, "event_id": event_id, "scene": scene, "t": timestamp},
              Explainer("click", title or item_id, item_id, item_vector), params)


def apply_query(profile: Profile, text: str, query_vector: np.ndarray, scene: Optional[str], event_id: str,
                timestamp: float, params: ModelParams) -> None:
    """Move the short-term interest toward what the user typed (in place)."""
    w = params.query_weight
    profile.short = _ema(profile.short, query_vector, _rate(params.query_short_alpha, w))
    profile.long = _ema(profile.long, query_vector, _rate(params.query_long_alpha, w))
    if scene and scene in profile.scenes:
        profile.scenes[scene] = _ema(profile.scenes[scene], query_vector, _rate(params.query_long_alpha, w))
    profile.intent = query_vector.astype(np.float32, copy=True)
    profile.intent_strength = 1.0
    profile.queries += 1
    _remember(profile, {"type": "query", "text": text, "event_id": event_id, "scene": scene, "t": timestamp},
              Explainer("query", text, event_id, query_vector), params)


def _remember(profile: Profile, entry: dict, explainer: Explainer, params: ModelParams) -> None:
    profile.history.append(entry)
    del profile.history[:max(0, len(profile.history) - params.history_size)]
    profile.last_time = max(profile.last_time, float(entry["t"]))
    same = [e for e in profile.explainers if e.kind == explainer.kind and e.ref != explainer.ref]
    other = [e for e in profile.explainers if e.kind != explainer.kind]
    keep = params.explain_clicks if explainer.kind == "click" else params.explain_queries
    same.append(explainer)
    same = same[max(0, len(same) - keep):]
    profile.explainers = other + same


def interest_distribution(profile: Profile, categories: int, params: ModelParams) -> dict[str, float]:
    """The softmax of the interest logits over ``categories`` catalog categories.

    Categories the user never touched share logit 0; the returned dict holds the touched ones
    and ``"*"``, the probability of each untouched category.
    """
    t = params.interest_temperature
    touched = profile.interest
    untouched = max(0, categories - len(touched))
    top = max([0.0, *touched.values()]) / t
    exps = {c: math.exp(v / t - top) for c, v in touched.items()}
    rest = math.exp(-top)
    total = sum(exps.values()) + untouched * rest
    out = {c: e / total for c, e in exps.items()}
    out["*"] = rest / total if untouched else 0.0
    return out


def query_vector(profile: Profile, scene: Optional[str], params: ModelParams) -> Optional[np.ndarray]:
    """The vector candidates are searched with: long- and short-term interest, the scene's own
    vector when the user has one (the long-term vector carries what is shared across scenes), and
    the intent of a recent query."""
    parts = []
    if profile.long is not None:
        parts.append(params.w_long * profile.long)
    if profile.short is not None:
        parts.append(params.w_short * profile.short)
    if scene and scene in profile.scenes:
        parts.append(params.w_scene * profile.scenes[scene])
    if profile.intent is not None and profile.intent_strength > 0.01:
        parts.append(params.w_intent * profile.intent_strength * profile.intent)
    if not parts:
        return None
    v = np.sum(parts, axis=0)
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else None
