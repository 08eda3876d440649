"""One small interface per storage role, the implementation chosen by URL scheme."""

from streams.stores.items import ItemIndex, ItemRow, open_item_index
from streams.stores.profiles import (ClickEffect, ConflictError, Effects, ProfileStore, StoreOptions, Write,
                                     open_profile_store)

__all__ = ["ItemIndex", "ItemRow", "open_item_index", "ClickEffect", "ConflictError", "Effects", "ProfileStore",
           "StoreOptions", "Write", "open_profile_store"]
