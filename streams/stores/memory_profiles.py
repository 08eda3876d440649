"""An in-process profile store with the same semantics as the Redis one (unit tests, trials)."""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

from models.profile import Profile
from streams.stores.profiles import (STAT_FIELDS, CoClick, ConflictError, PopularityUpdate, ProfileStore,
                                     cooccur_pairs, decayed_weight, normalised_cooccurrence)


class MemoryProfileStore(ProfileStore):
    """Profiles in a dict. Not shared between processes."""

    def __init__(self, *, dedupe_window: int = 10_000, popularity_halflife_s: float = 6 * 3600.0,
                 cooccur_keep: int = 200) -> None:
        self.dedupe_window = dedupe_window
        self.cooccur_keep = cooccur_keep
        self._co: dict[str, dict[str, float]] = {}
        self._clicks: dict[str, float] = {}
        self.halflife = popularity_halflife_s
        self._profiles: dict[str, Profile] = {}
        self._events: dict[str, list[str]] = {}
        self._pop: dict[Optional[str], dict[str, float]] = {None: {}}
        self._ref: Optional[float] = None
        self._new: dict[str, float] = {}
        self._cats: set[str] = set()
        self._stats: dict[str, int] = {k: 0 for k in STAT_FIELDS}

    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        return {u: copy.deepcopy(self._profiles.get(u)) or Profile(user_id=u) for u in user_ids}

    async def applied(self, user_ids_event_ids: Sequence[tuple[str, str]]) -> list[bool]:
        return [e in self._events.get(u, ()) for u, e in user_ids_event_ids]

    async def commit(self, profile: Profile, expected_version: int, new_seen: Iterable[str],
                     event_ids: Sequence[str]) -> int:
        stored = self._profiles.get(profile.user_id)
        if (stored.version if stored else 0) != expected_version:
            raise ConflictError(f"profile of {profile.user_id!r} changed since version {expected_version}")
        events = self._events.setdefault(profile.user_id, [])
        if any(e in events for e in event_ids):
            raise ConflictError(f"an event of {profile.user_id!r} was applied concurrently")
        events.extend(event_ids)
        del events[:-self.dedupe_window]
        saved = copy.deepcopy(profile)
        saved.version = expected_version + 1
        if stored:
            saved.seen = stored.seen | set(new_seen)
        self._profiles[profile.user_id] = saved
        profile.version = saved.version
        return saved.version

    async def forget(self, user_id: str) -> None:
        self._profiles.pop(user_id, None)
        self._events.pop(user_id, None)

    async def bump_cooccurrence(self, clicks: Sequence[CoClick]) -> None:
        for c in clicks:
            self._clicks[c.item_id] = self._clicks.get(c.item_id, 0.0) + 1.0
        touched = set()
        for a, b in cooccur_pairs(clicks):
            row = self._co.setdefault(a, {})
            row[b] = row.get(b, 0.0) + 1.0
            touched.add(a)
        for a in touched:  # keep the most frequent partners; of equal ones the greatest ids, as Redis does
            row = self._co[a]
            if len(row) > self.cooccur_keep:
                self._co[a] = dict(sorted(row.items(), key=lambda kv: (kv[1], kv[0]))[-self.cooccur_keep:])

    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        rows = {a: sorted(self._co.get(a, {}).items(), key=lambda kv: (-kv[1], kv[0])) for a in item_ids}
        return normalised_cooccurrence(rows, self._clicks, n)

    async def bump_popularity(self, updates: Sequence[PopularityUpdate]) -> None:
        for u in updates:
            if self._ref is None:
                self._ref = u.timestamp
            w = decayed_weight(u.timestamp, self._ref, self.halflife, u.weight)
            for scene in {None, u.scene}:
                table = self._pop.setdefault(scene, {})
                table[u.item_id] = table.get(u.item_id, 0.0) + w

    async def popular(self, scene: Optional[str], n: int) -> list[tuple[str, float]]:
        table = self._pop.get(scene) if scene and len(self._pop.get(scene, {})) >= n else self._pop[None]
        return sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        for item_id, ts, cat in items:
            self._new[item_id] = ts
            if cat:
                self._cats.add(cat)

    async def remove_items(self, item_ids: Sequence[str], scenes: Sequence[str]) -> None:
        for i in item_ids:
            self._new.pop(i, None)
            self._clicks.pop(i, None)
            self._co.pop(i, None)
            for table in self._pop.values():
                table.pop(i, None)

    async def newest(self, n: int) -> list[tuple[str, float]]:
        return sorted(self._new.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    async def category_count(self) -> int:
        return len(self._cats)

    async def incr_stats(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            self._stats[k] = self._stats.get(k, 0) + v

    async def stats(self) -> dict[str, int]:
        return dict(self._stats)
