"""One small interface per storage role, the implementation chosen by URL scheme. The interfaces
(``items``, ``profiles``) know no implementation; the factories here import the one a URL names."""

from __future__ import annotations

from typing import Optional

from streams.stores.items import ItemIndex, ItemRow, MemoryItemIndex
from streams.stores.profiles import ClickEffect, ConflictError, Effects, ProfileStore, StoreOptions, Write


def open_item_index(uri: str, dim: int, collection: str = "streamrec_items", token: str = "",
                    consistency: str = "Strong", index_type: str = "FLAT", flush_writes: bool = True,
                    timeout_s: float = 30.0, encoder: str = "") -> ItemIndex:
    """The item index at ``uri`` for vectors of ``dim`` dimensions made by ``encoder`` (its version:
    a new collection records it, an existing one of another encoder raises :class:`EncoderMismatch`)."""
    if uri.startswith("memory://"):
        return MemoryItemIndex(dim)
    if uri.startswith(("http://", "https://", "tcp://", "unix:")) or uri.endswith(".db"):
        from streams.stores.milvus_items import MilvusItemIndex

        return MilvusItemIndex(uri, dim, collection, token=token, consistency=consistency, index_type=index_type,
                               flush_writes=flush_writes, timeout_s=timeout_s, encoder=encoder)
    raise ValueError(f"no item index for URI {uri!r} (use http(s)://host:port, a .db file, or memory://)")


def open_profile_store(url: str, key_prefix: str = "streamrec", options: StoreOptions = StoreOptions(),
                       redis_options: Optional[dict] = None) -> ProfileStore:
    """The profile store for ``url``: ``redis://``, ``rediss://``, ``unix://`` (one Redis),
    ``redis+cluster://host:port[,host:port]`` (a Redis Cluster; ``rediss+cluster://`` for TLS) or
    ``memory://``; ``redis_options`` are further redis-py arguments (credentials, TLS files)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        from streams.stores.redis_profiles import RedisProfileStore

        return RedisProfileStore(url, key_prefix, options, redis_options=redis_options)
    if scheme == "memory":
        from streams.stores.memory_profiles import MemoryProfileStore

        return MemoryProfileStore(options)
    raise ValueError(f"no profile store for URL scheme {scheme!r} (use redis://, rediss://, unix://, "
                     f"redis+cluster:// or memory://)")


__all__ = ["ItemIndex", "ItemRow", "open_item_index", "ClickEffect", "ConflictError", "Effects", "ProfileStore",
           "StoreOptions", "Write", "open_profile_store"]
