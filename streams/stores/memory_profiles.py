"""An in-process profile store with the same semantics as the Redis one (unit tests, trials)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from models.learning import FEATURES, MODEL_ID
from models.profile import Profile
from streams.stores import codec
from streams.stores.profiles import (STAT_FIELDS, DELIVERY_STATS, Effects, ProfileStore, StoreOptions, Write,
                                     decayed_weight, normalised_cooccurrence, normalised_transitions, shard_of,
                                     transition_weights)


class MemoryProfileStore(ProfileStore):
    """Profiles (as encoded records) and counters in dicts. Not shared between processes."""

    def __init__(self, options: StoreOptions = StoreOptions()) -> None:
        self.o = options
        self._records: dict[str, bytes] = {}
        self._wm: dict[tuple[int, str], int] = {}  # (shard, source) -> last applied offset
        self._batches: dict[str, dict[str, int]] = {}  # source -> the last batch begun with it
        self._ref: Optional[float] = None  # decay references: popularity, co-clicks
        self._cref: Optional[float] = None
        self._pop: dict[Optional[str], dict[str, float]] = {None: {}}
        self._n: dict[str, float] = {}
        self._co: dict[str, dict[str, float]] = {}
        self._tr: dict[str, dict[str, float]] = {}
        self._numbers: dict[str, int] = {}
        self._new: dict[str, float] = {}
        self._cats: set[str] = set()
        self._progress: dict[int, int] = {}
        self._stats: dict[str, int] = {k: 0 for k in STAT_FIELDS}
        self._model: dict[str, float | str] = {}
        self.totals = {"clicks": 0, "pairs": 0, "steps": 0}  # raw counts of applied effects, for audits

    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        out = {}
        for u in dict.fromkeys(user_ids):
            raw = self._records.get(u)
            if raw is None:
                out[u] = Profile(user_id=u)
                continue
            try:
                p, forgotten = codec.decode(u, raw)
            except codec.CorruptProfile as exc:
                out[u] = Profile(user_id=u, version=codec.record_version(raw), reset=str(exc))
                continue
            if forgotten:
                p = Profile(user_id=u, version=p.version, applied=p.applied)
            out[u] = p
        return out

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        done = []
        for w in writes:
            u = w.profile.user_id
            stored = self._records.get(u)
            ok = w.replace or codec.record_version(stored) == w.expected
            if ok:
                version = w.expected % 0xFFFFFFFF + 1
                self._records[u] = codec.encode(w.profile, version, forgotten=w.forgotten)
                w.profile.version = version
            done.append(ok)
        return done

    def _fresh(self, shard: int, source: str, offset: int, pending: dict) -> bool:
        """Is (source, offset) past the shard's watermark? Notes the new watermark in ``pending``."""
        key = (shard, source)
        if offset <= self._wm.get(key, -1):
            return False
        pending[key] = max(pending.get(key, -1), offset)
        return True

    async def apply(self, effects: Effects) -> None:
        pending: dict[tuple[int, str], int] = {}
        S = self.o.shards
        for source, offset, c in effects.clicks:
            if self._fresh(shard_of(c.item_id, S), source, offset, pending):
                self._move_references(c.timestamp)
                w = decayed_weight(c.timestamp, self._ref, self.o.popularity_halflife_s, c.weight)
                for scene in {None, c.scene}:
                    table = self._pop.setdefault(scene, {})
                    table[c.item_id] = table.get(c.item_id, 0.0) + w
                self._n[c.item_id] = self._n.get(c.item_id, 0.0) + self._co_weight(c.timestamp)
                self.totals["clicks"] += 1
            for prev in dict.fromkeys(c.previous):
                if prev == c.item_id:
                    continue
                for a, b in ((c.item_id, prev), (prev, c.item_id)):
                    if self._fresh(shard_of(a, S), source, offset, pending):
                        row = self._co.setdefault(a, {})
                        row[b] = row.get(b, 0.0) + self._co_weight(c.timestamp)
                        self.totals["pairs"] += 1
                        if len(row) > self.o.cooccur_keep:  # the weakest partner goes (of equal ones the least id)
                            del row[min(row, key=lambda k: (row[k], k))]
            for prev, w in transition_weights(c):
                if self._fresh(shard_of(prev, S), source, offset, pending):
                    row = self._tr.setdefault(prev, {})
                    row[c.item_id] = row.get(c.item_id, 0.0) + w * self._co_weight(c.timestamp)
                    self.totals["steps"] += 1
                    if len(row) > self.o.cooccur_keep:
                        del row[min(row, key=lambda k: (row[k], k))]
        for source, offset, name, n in effects.stats:
            if name in DELIVERY_STATS or self._fresh(shard_of(source, S), source, offset, pending):
                self._stats[name] = self._stats.get(name, 0) + n
        for source, offset, step in effects.learn:
            if self._fresh(-1, source, offset, pending):
                if self._model.get("model") != MODEL_ID:
                    self._model = {"model": MODEL_ID}
                for name, v in zip(FEATURES, step, strict=True):
                    self._model[name] = float(self._model.get(name, 0.0)) + float(v)
                self._model["steps"] = float(self._model.get("steps", 0.0)) + 1
        for key, offset in pending.items():
            self._wm[key] = offset

    async def model(self) -> dict[str, float | str]:
        return dict(self._model)

    def _move_references(self, t: float) -> None:
        """Like the Redis store: a reference moves forward (and what is scored against it
        rescales) before a weight would leave the float range."""
        if self._ref is None:
            self._ref = self._cref = t
        shift = math.floor((t - self._ref) / self.o.popularity_halflife_s) - 1
        if shift > 63:
            self._ref += shift * self.o.popularity_halflife_s
            for table in self._pop.values():
                for i in table:
                    table[i] *= 2.0 ** -shift
        shift = math.floor((t - self._cref) / self.o.cooccur_halflife_s) - 1
        if shift > 63:
            self._cref += shift * self.o.cooccur_halflife_s
            f = 2.0 ** -shift
            for i in self._n:
                self._n[i] *= f
            for row in (*self._co.values(), *self._tr.values()):
                for j in row:
                    row[j] *= f

    def _co_weight(self, t: float) -> float:
        return decayed_weight(t, self._cref if self._cref is not None else t, self.o.cooccur_halflife_s, 1.0)

    async def published(self, sources: Sequence[str]) -> dict[str, int]:
        return {src: self._wm.get((shard_of(src, self.o.shards), src), -1) for src in sources}

    async def begin(self, batch: dict[str, int]) -> dict[str, int]:
        for src in batch:
            self._batches[src] = dict(batch)
        return await self.published(list(batch))

    async def positions(self, sources: Sequence[str]) -> dict[str, tuple[int, dict[str, int]]]:
        wm = await self.published(sources)
        return {src: (wm[src], dict(self._batches.get(src, {}))) for src in sources}

    async def number_items(self, item_ids: Sequence[str]) -> dict[str, int]:
        for i in item_ids:
            self._numbers.setdefault(i, len(self._numbers))
        return {i: self._numbers[i] for i in item_ids}

    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        rows = {a: sorted(self._co.get(a, {}).items(), key=lambda kv: (-kv[1], kv[0])) for a in item_ids}
        return normalised_cooccurrence(rows, self._n, n)

    async def transitions(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        rows = {a: list(self._tr.get(a, {}).items()) for a in item_ids}
        return normalised_transitions(rows, self._n, n)

    async def item_clicks(self, item_ids: Sequence[str], at: float) -> dict[str, float]:
        if self._cref is None:
            return {i: 0.0 for i in item_ids}
        f = math.pow(2.0, (self._cref - at) / self.o.cooccur_halflife_s)
        return {i: self._n.get(i, 0.0) * f for i in item_ids}

    def _popular_table(self, scene: Optional[str], enough: int) -> dict[str, float]:
        return self._pop[scene] if scene and len(self._pop.get(scene, {})) >= enough else self._pop[None]

    async def popular(self, scene: Optional[str], n: int, enough: Optional[int] = None) -> list[tuple[str, float]]:
        table = self._popular_table(scene, n if enough is None else enough)
        return sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    async def popularity(self, item_ids: Sequence[str], scene: Optional[str], enough: int) -> dict[str, float]:
        table = self._popular_table(scene, enough)
        top = max(table.values(), default=0.0)
        return {i: table.get(i, 0.0) / top if top > 0 else 0.0 for i in item_ids}

    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        for item_id, ts, cat in items:
            self._new[item_id] = ts
            if cat:
                self._cats.add(cat)

    async def remove_items(self, item_ids: Sequence[str]) -> None:
        for i in item_ids:
            self._new.pop(i, None)
            self._n.pop(i, None)
            self._co.pop(i, None)
            self._tr.pop(i, None)
            for table in self._pop.values():
                table.pop(i, None)

    async def newest(self, n: int) -> list[tuple[str, float]]:
        return sorted(self._new.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    async def category_count(self) -> int:
        return len(self._cats)

    async def catalog_progress(self) -> dict[int, int]:
        return dict(self._progress)

    async def set_catalog_progress(self, progress: dict[int, int]) -> None:
        for part, off in progress.items():
            self._progress[part] = max(off, self._progress.get(part, -1))

    async def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def memory_usage(self, user_id: str) -> int:
        return len(self._records.get(user_id, b""))

    def corrupt(self, user_id: str, raw: bytes) -> None:
        """Store ``raw`` as ``user_id``'s record (tests of recovery from bad state)."""
        self._records[user_id] = raw
