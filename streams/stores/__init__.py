"""One small interface per storage role, the implementation chosen by URL scheme."""

from streams.stores.items import ItemIndex, ItemRow, open_item_index
from streams.stores.profiles import ConflictError, PopularityUpdate, ProfileStore, open_profile_store

__all__ = ["ItemIndex", "ItemRow", "open_item_index", "ConflictError", "PopularityUpdate", "ProfileStore",
           "open_profile_store"]
