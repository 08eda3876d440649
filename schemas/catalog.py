"""Catalog stream: item upserts and deletes, keyed by item_id."""

from __future__ import annotations

import faust
from faust.models.fields import StringField


class ItemUpsert(faust.Record, namespace="streamrec.v1.ItemUpsert", validation=True):
    """Create or replace an item. Its text is title, description, category and tags."""

    item_id: str
    title: str
    timestamp: float
    description: str = StringField(required=False, allow_blank=True, default="")
    category: str = StringField(required=False, allow_blank=True, default="")
    tags: list[str] = []
    scenes: list[str] = []  # scenes the item is offered in; empty: every scene
    available: bool = True

    def text(self) -> str:
        """The text the encoder turns into the item's vector."""
        parts = [self.title, self.description, self.category, " ".join(self.tags)]
        return ". ".join(p for p in parts if p)


class ItemDelete(faust.Record, namespace="streamrec.v1.ItemDelete", validation=True):
    """Remove an item: it is never recommended again."""

    item_id: str
    timestamp: float
