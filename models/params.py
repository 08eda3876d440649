"""Parameters of profile updates and ranking."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelParams:
    """Decay rates, weights and ranking knobs.

    Vector updates are exponential moving averages: a click of weight ``w`` moves a vector by
    ``alpha_w = 1 - (1 - alpha) ** w`` toward the clicked item's vector.
    """

    long_alpha: float = 0.08  # long-term vector: slow, shared across scenes
    short_alpha: float = 0.35  # short-term vector: fast, follows the session
    scene_alpha: float = 0.25  # per-scene vectors
    query_short_alpha: float = 0.6  # a typed query moves the short-term interest strongly
    query_long_alpha: float = 0.02
    click_weight: float = 1.0
    query_weight: float = 1.0
    dwell_full_s: float = 30.0  # dwell at or above this counts as a full-weight click
    category_decay: float = 0.9  # interest logits decay by this per unit of feedback
    interest_temperature: float = 1.0  # softmax temperature of the interest distribution
    w_long: float = 0.35  # mix of the ranking query vector
    w_short: float = 0.65
    w_scene: float = 0.8
    w_intent: float = 1.0  # weight of the last query while its intent is fresh
    intent_decay: float = 0.5  # the intent's strength is multiplied by this at every later click
    w_interest: float = 0.1  # boost by the interest probability of the item's category
    w_scene_item: float = 0.03  # boost for items offered in the request's scene
    w_popularity: float = 0.15  # boost by an item's decayed popularity relative to the most popular (0: off)
    w_cooccur: float = 0.3  # boost by how often the user's recent clicks were clicked with the item (0: off)
    cooccur_window: int = 10  # a click counts as clicked-with each of the user's last this many clicks
    cooccur_sources: int = 10  # the user's last clicks whose co-clicked items become candidates
    cooccur_fanout: int = 50  # co-clicked items read per source
    diversity: float = 0.02  # penalty per item of the same category already in the list
    oversample: int = 2  # candidates fetched per slot in the list
    history_size: int = 20
    max_scenes: int = 4  # scene vectors kept per user (the most recently used)
    max_interests: int = 24  # category logits kept per user (the strongest)
    text_keep: int = 100  # characters of a query kept in the history and its explanation
    recent_events: int = 16  # event ids remembered per user beside the per-partition offsets
    explain_clicks: int = 5  # recent clicks kept (with vectors) for explanations
    explain_queries: int = 3
    reason_min_similarity: float = 0.35
