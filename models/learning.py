"""The ranker's weights, learned online from the stream.

Every candidate of a list gets a feature vector (:data:`FEATURES`, each in [-1, 1]); its score is
the dot product with the weights. The list shown is remembered with its candidates' features (an
:class:`Impression`). When the user's next click picks one of them, that click is a preference of
the clicked item over every other remembered candidate, and the weights take one step of
pairwise logistic regression (BPR-style) on those pairs, pulled gently back toward the defaults.

The weights in use are the defaults plus the sum of every step taken: steps are plain additive
deltas, so stores apply each click's step once (tagged with its event's source and offset) and
workers share one model without locks. A new deployment starts from the defaults; a model whose
features differ from this code's is ignored (:func:`weights_from`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

#: Feature names, in the order of every feature vector. The ``_rank`` ones are 1 / (1 + rank) of the
#: candidate by that signal among the list's candidates (0 without the signal): scale-free, so the
#: same defaults hold whatever the data set's counts. ``text_cold`` is the cosine times
#: 1 / (1 + the item's decayed clicks): how much text can count where behaviour is thin.
FEATURES = ("text", "cooccur", "transitions", "popularity", "interest", "scene",
            "text_rank", "cooccur_rank", "transitions_rank", "popularity_rank", "text_cold")
F = len(FEATURES)
#: Which signal each feature belongs to (for ablations and reasons).
SIGNAL_OF = {"text": "text", "text_rank": "text", "cooccur": "cooccur", "cooccur_rank": "cooccur",
             "transitions": "transitions", "transitions_rank": "transitions", "popularity": "popularity",
             "popularity_rank": "popularity", "interest": "interest", "scene": "interest", "text_cold": "text"}
#: What ``ModelParams.signals_off`` may name (``learning`` keeps the weights at their defaults).
SIGNALS = ("text", "cooccur", "transitions", "popularity", "interest", "learning")
MODEL_ID = "rank-v1:" + ",".join(FEATURES)


def default_weights(params) -> np.ndarray:
    """The weights a new deployment starts from (``ModelParams``' ``w_*``)."""
    w = np.zeros(F, dtype=np.float64)
    w[FEATURES.index("text")] = params.w_text
    w[FEATURES.index("cooccur")] = params.w_cooccur
    w[FEATURES.index("transitions")] = params.w_transitions
    w[FEATURES.index("popularity")] = params.w_popularity
    w[FEATURES.index("interest")] = params.w_interest
    w[FEATURES.index("scene")] = params.w_scene_item
    return w


def weights_from(stored: Optional[Mapping[str, float]], params) -> np.ndarray:
    """The weights in use: defaults plus the stored sum of steps (when it is this model's).
    Features whose signal is switched off (``params.signals``) weigh 0."""
    w = default_weights(params)
    if stored and stored.get("model") == MODEL_ID and "learning" not in params.off:
        w = w + np.array([float(stored.get(name, 0.0)) for name in FEATURES])
    return w * signal_mask(params)


def signal_mask(params) -> np.ndarray:
    off = params.off
    return np.array([0.0 if SIGNAL_OF[f] in off else 1.0 for f in FEATURES])


def squash(x: np.ndarray) -> np.ndarray:
    """[0, inf) -> [0, 1)."""
    return x / (1.0 + x)


def rank_feature(values: np.ndarray) -> np.ndarray:
    """1 / (1 + rank) by ``values``, descending (ties share the better rank); 0 where value <= 0."""
    out = np.zeros(len(values))
    pos = values > 0
    if pos.any():
        v = values[pos]
        # rank = how many strictly greater values
        order = np.sort(v)[::-1]
        ranks = np.searchsorted(-order, -v, side="left")
        out[pos] = 1.0 / (1.0 + ranks)
    return out


@dataclass
class Impression:
    """A list as shown: the catalog numbers of its best candidates and their features (int8, x/127)."""

    numbers: list[int] = field(default_factory=list)
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, F), dtype=np.int8))

    @staticmethod
    def of(numbers: Sequence[int], X: np.ndarray) -> "Impression":
        q = np.clip(np.round(np.asarray(X, dtype=np.float64) * 127.0), -127, 127).astype(np.int8)
        return Impression(list(numbers), q.reshape(len(numbers), F))

    def matrix(self) -> np.ndarray:
        return self.features.astype(np.float64) / 127.0


def pairwise_step(imp: Impression, clicked: int, weights: np.ndarray, params) -> Optional[np.ndarray]:
    """The step a click on catalog number ``clicked`` gives, when it was one of ``imp``'s
    candidates: the clicked one against every other (mean pairwise logistic loss), with L2 toward
    the defaults. None when the click says nothing about the ranking."""
    if params.learn_rate <= 0 or "learning" in params.off or clicked not in imp.numbers or len(imp.numbers) < 2:
        return None
    X = imp.matrix()
    i = imp.numbers.index(clicked)
    diff = X[i] - np.delete(X, i, axis=0)  # (m, F): positive minus each negative
    margin = diff @ weights
    coef = 1.0 / (1.0 + np.exp(np.clip(margin, -50, 50)))  # sigma(-margin)
    grad = -(coef[:, None] * diff).mean(axis=0)
    grad += params.learn_l2 * (weights - default_weights(params))
    step = -params.learn_rate * grad * signal_mask(params)
    return step if np.any(step) else None
