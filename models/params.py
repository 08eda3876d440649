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
    # Default weights of the ranker's features (models.learning.FEATURES); the weights in use
    # are learned from the stream, starting here.
    w_text: float = 1.0  # cosine of the user's ranking vector and the item
    w_popularity: float = 0.15  # decayed popularity relative to the most popular (0: off)
    w_cooccur: float = 0.5  # co-clicks with the user's recent clicks (squashed sum; 0: off)
    w_transitions: float = 0.5  # steps from the user's last clicks to the item (squashed sum; 0: off)
    signals_off: str = ""  # signals switched off, comma-separated (models.learning.SIGNALS), for ablations
    learn_rate: float = 0.05  # step of the online pairwise update of the weights (0: no learning)
    learn_l2: float = 0.01  # pull of the learned weights back toward the defaults
    impression_size: int = 20  # candidates remembered per list (with features) to learn from the next click
    transition_sources: int = 3  # the user's last clicks whose next clicks become candidates
    transition_fanout: int = 50  # next-clicked items read per source
    cooccur_window: int = 10  # a click counts as clicked-with each of the user's last this many clicks
    cooccur_sources: int = 10  # the user's last clicks whose co-clicked items become candidates
    cooccur_fanout: int = 0  # co-clicked items read per source (0: every partner the store keeps)
    # lists count the co-clicks and steps of their batch's earlier clicks (HR@10 up with large batches,
    # the worker's CPU an event up too: see README, Evaluation)
    fresh_behaviour: bool = False
    diversity: float = 0.02  # penalty per item of the same category already in the list
    oversample: int = 1  # candidates per slot in the list that text and popularity each add
    behaviour_oversample: int = 3  # candidates per slot that co-clicks and steps each add (their rows are read anyway)
    history_size: int = 20
    max_scenes: int = 4  # scene vectors kept per user (the most recently used)
    max_interests: int = 24  # category logits kept per user (the strongest)
    text_keep: int = 100  # characters of a query kept in the history and its explanation
    recent_events: int = 16  # event ids remembered per user beside the per-partition offsets
    explain_clicks: int = 5  # recent clicks kept (with vectors) for explanations
    explain_queries: int = 3
    reason_min_similarity: float = 0.35

    def __post_init__(self) -> None:
        from models.learning import SIGNALS

        unknown = sorted(set(self.off) - set(SIGNALS))
        if unknown:
            raise ValueError(f"signals_off names unknown signals {unknown}: use {', '.join(SIGNALS)}")

    @property
    def off(self) -> frozenset[str]:
        """The signals switched off."""
        return frozenset(x.strip() for x in self.signals_off.split(",") if x.strip())
