"""A user's profile and its online updates from clicks and queries."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from models.learning import Impression
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
    whose softmax is the interest distribution. ``seen`` holds the catalog numbers of every item
    the user clicked; ``applied`` tells which events the profile has taken in. Everything but
    ``seen`` is bounded by ``ModelParams``; ``seen`` by the catalog size.
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
    seen: set[int] = field(default_factory=set)
    clicks: int = 0
    queries: int = 0
    last_time: float = 0.0
    applied: "Applied" = field(default_factory=lambda: Applied())
    encoder: str = ""  # the encoder that made the vectors
    shown: "Impression" = field(default_factory=lambda: Impression())  # the last list's best candidates
    reset: str = ""  # why the stored record could not be read (it is replaced by this profile)

    @property
    def is_cold(self) -> bool:
        return self.long is None and self.short is None


def _event_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


DIGEST_MOD = (1 << 61) - 1


@dataclass
class Applied:
    """Which events a profile has taken in, in bounded space.

    Kafka delivers one user's events in order within a partition, so the last applied offset per
    source (``topic:partition``; the latest ``MAX_SOURCES``) recognises any redelivery; the hashes
    of the last ``recent`` event ids recognise the same event arriving again at another offset (a
    replay into the live topic). ``count`` and ``digest`` (the sum of the event-id hashes modulo a
    prime) cover every event since the profile began, so an audit can tell an event applied twice
    or lost without keeping the ids.
    """

    MAX_SOURCES = 4

    offsets: dict[int, int] = field(default_factory=dict)  # source hash -> last applied offset
    recent: list[int] = field(default_factory=list)  # event-id hashes, oldest first
    count: int = 0
    digest: int = 0

    @staticmethod
    def source(topic: str, partition: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{topic}:{partition}".encode(), digest_size=4).digest(), "little")

    def seen_before(self, source: Optional[int], offset: int, event_id: str) -> bool:
        if source is not None and offset <= self.offsets.get(source, -1):
            return True
        return _event_hash(event_id) in self.recent

    def record(self, source: Optional[int], offset: int, event_id: str, recent: int) -> None:
        h = _event_hash(event_id)
        if source is not None:
            self.offsets.pop(source, None)
            self.offsets[source] = offset
            while len(self.offsets) > self.MAX_SOURCES:
                self.offsets.pop(next(iter(self.offsets)))
        self.recent.append(h)
        del self.recent[:max(0, len(self.recent) - recent)]
        self.count += 1
        self.digest = (self.digest + h % DIGEST_MOD) % DIGEST_MOD

    @staticmethod
    def expected(event_ids: list[str]) -> tuple[int, int]:
        """(count, digest) of a profile that took in exactly ``event_ids``."""
        return len(event_ids), sum(_event_hash(e) % DIGEST_MOD for e in event_ids) % DIGEST_MOD


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


def apply_click(profile: Profile, item_id: str, item_no: int, item_vector: np.ndarray, title: str, category: str,
                scene: Optional[str], strength: float, timestamp: float, params: ModelParams) -> None:
    """Move the profile toward a clicked item (in place); ``item_no`` is its catalog number."""
    profile.long = _ema(profile.long, item_vector, _rate(params.long_alpha, strength))
    profile.short = _ema(profile.short, item_vector, _rate(params.short_alpha, strength))
    if scene:
        old = profile.scenes.pop(scene, None)  # the most recently used scene goes last
        profile.scenes[scene] = _ema(old, item_vector, _rate(params.scene_alpha, strength))
        while len(profile.scenes) > params.max_scenes:
            profile.scenes.pop(next(iter(profile.scenes)))
    if category:
        decay = params.category_decay ** strength
        for c in profile.interest:
            profile.interest[c] *= decay
        profile.interest[category] = profile.interest.get(category, 0.0) + strength
        if len(profile.interest) > params.max_interests:  # the weakest interests go
            for c in sorted(profile.interest, key=lambda c: (profile.interest[c], c))[: len(profile.interest) - params.max_interests]:
                del profile.interest[c]
    profile.intent_strength *= params.intent_decay ** strength
    profile.seen.add(item_no)
    profile.clicks += 1
    _remember(profile, {"type": "click", "item_id": item_id, "scene": scene, "t": timestamp},
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
    _remember(profile, {"type": "query", "text": text[: params.text_keep], "scene": scene, "t": timestamp},
              Explainer("query", text[: params.text_keep], event_id, query_vector), params)


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
