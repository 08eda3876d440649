"""User events: clicks, queries and forget requests, keyed by user_id, on one topic so that
each user's events keep their order."""

from __future__ import annotations

from typing import Optional

import faust


class Click(faust.Record, namespace="streamrec.v1.Click", validation=True):
    """A user interacted with an item. ``weight`` scales the feedback; ``dwell_s`` (seconds on
    the item) scales it further when given."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: float
    scene: Optional[str] = None
    weight: float = 1.0
    dwell_s: Optional[float] = None


class Query(faust.Record, namespace="streamrec.v1.Query", validation=True):
    """A user typed a search: it moves the short-term interest."""

    event_id: str
    user_id: str
    text: str
    timestamp: float
    scene: Optional[str] = None


class ForgetUser(faust.Record, namespace="streamrec.v1.ForgetUser", validation=True):
    """Delete everything streamrec keeps about a user."""

    event_id: str
    user_id: str
    timestamp: float
