"""Recommendation requests in, recommendation lists out."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import faust


class RecommendationRequest(faust.Record, namespace="streamrec.v1.RecommendationRequest", validation=True):
    """Ask for a list from the user's current profile; the profile is not changed."""

    request_id: str
    user_id: str
    timestamp: float
    k: Optional[int] = None
    scene: Optional[str] = None
    categories: list[str] = []  # only items of these categories; empty: any
    exclude: list[str] = []  # item ids never to return


class RecommendedItem(faust.Record, namespace="streamrec.v1.RecommendedItem"):
    """One ranked item with its score and a short human-readable reason."""

    item_id: str
    score: float
    reason: str
    title: str = ""
    category: str = ""


class Recommendations(faust.Record, namespace="streamrec.v1.Recommendations"):
    """The list produced after one input event (or request), keyed by user_id."""

    user_id: str
    trigger_event_id: str
    trigger_type: str  # click, query or request
    items: list[RecommendedItem]
    model_version: str
    encoder: str
    event_time: float
    produced_time: float
    scene: Optional[str] = None
    cold_start: bool = False
    duplicate: bool = False  # the trigger event had been applied before (redelivery)


def recommendations_json(user_id: str, trigger_event_id: str, trigger_type: str,
                         items: Sequence[tuple[str, float, str, str, str]], model_version: str, encoder: str,
                         event_time: float, produced_time: float, scene: Optional[str] = None,
                         cold_start: bool = False, duplicate: bool = False) -> bytes:
    """The wire bytes of a :class:`Recommendations` (``items``: item id, score, reason, title and
    category of each), exactly ``json.dumps(to_wire(Recommendations(...))).encode()``, without
    building the records: a list goes out after every event."""
    return json.dumps({
        "schema": _NAMESPACE, "user_id": user_id, "trigger_event_id": trigger_event_id, "trigger_type": trigger_type,
        "items": [{"item_id": i, "score": sc, "reason": r, "title": t, "category": c} for i, sc, r, t, c in items],
        "model_version": model_version, "encoder": encoder, "event_time": event_time, "produced_time": produced_time,
        "scene": scene, "cold_start": cold_start, "duplicate": duplicate}).encode()


_NAMESPACE = Recommendations._options.namespace
