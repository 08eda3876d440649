"""What the agents do with a micro-batch, apart from Kafka: decode, update profiles, rank, and
build the messages to publish.

A batch runs in three steps: ``process_*`` computes everything (lists, new profiles, per-item
effects) and writes nothing; the agent publishes the messages; :meth:`Pipeline.commit` then
applies the effects and writes the profiles; the agent acks. Every effect carries its event's
(source, offset), and every profile says which events it holds, so a batch that runs again after
a crash or a retry applies no event twice.

A list is marked ``duplicate`` only when it was published before: its event is applied to the
profile, or its batch's effects are (both come after the publish). Such a list is made from the
state as it is now (the profile after the user's later events), not as it was right after the
event. An event whose batch stopped between the publish and the effects gets its list again
unmarked, made from the same state: the batch is noted before its lists go out, and taken again as
it was (:meth:`Pipeline.next_batch`), since lists see the per-item state and the ranker's weights as
they were before their batch.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import itertools
import json
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from models.params import ModelParams
from models.profile import (Applied, Explainer, Profile, apply_click, apply_query, click_strength,
                            interest_distribution, query_vector)
from models.learning import Impression, pairwise_step, weights_from
from models.ranking import Candidate, Job, Ranked, Signals, cold_start, rank_many
from schemas import (Click, DeadLetter, ForgetUser, InvalidMessage, ItemDelete, ItemUpsert, Limits, Query,
                     RecommendationRequest, parse_catalog, parse_event, parse_request)
from schemas.recommendations import recommendations_json
from schemas.validate import to_wire
from streams.executors import LATER, PriorityExecutor
from streams.metrics import Metrics, Timed
from streams.stores import codec
from streams.stores.items import ItemIndex, ItemRow
from streams.stores.profiles import ClickEffect, ConflictError, Effects, ProfileStore, Write, transition_weights

log = logging.getLogger("streamrec.pipeline")

MODEL_VERSION = "streamrec-1"
#: Seen sets at least this large are excluded in the item index instead of over-fetched.
EXCLUDE_IN_INDEX = 64
#: Encoder chunks encoded ahead and kept for the batches behind the running one: at least this
#: many, and two batches' worth of the largest batch shown to :meth:`Pipeline.prefetch`.
PREFETCH_CHUNKS = 8
#: Every list first takes its candidates from a plain search of (at most) this many times its
#: limit; only where its seen items leave too few does it search again.
PROBE = 1.5
#: The most popular items read first for each scene in a batch; a list whose seen items leave it
#: short reads further, up to its own need. A scene's own popularity is used once its list holds
#: at least this many items.
POPULAR_READ = 64


def _eights(n: int) -> int:
    """``n`` rounded up to a multiple of 8, so that lists of similar sizes share a search."""
    return -(-n // 8) * 8


def search_limit(k: int, oversample: int, excluded: int = 0) -> tuple[int, int]:
    """A list's index search: the unseen items it keeps (``k * oversample``, plus its excluded
    ones) and the hits its first, plain search asks (``PROBE`` times that, rounded up to a
    multiple of 8 so that lists of similar sizes share a search)."""
    limit = k * oversample + excluded
    return limit, _eights(math.ceil(limit * PROBE))


@dataclass
class _Popular:
    """The first items of an order read so far (the most popular of one scene, or the newest):
    ``items`` with vectors (unknown and unavailable ones left out) and the rank of each; ``read``
    rows were read and ``exhausted`` says whether the store had no more."""

    items: list[Candidate]
    ranks: list[int]
    read: int
    exhausted: bool

    def covers(self, bound: int) -> bool:
        return self.exhausted or self.read >= bound

    def unseen(self, seen: Any, exclude: Collection[str], bound: int) -> Iterator[Candidate]:
        """The items among the first ``bound`` of the order that are neither seen nor excluded, in
        that order."""
        for c, r in zip(self.items, self.ranks):
            if r >= bound:
                return
            if c.no not in seen and c.item_id not in exclude:
                yield c


def popular_bound(a: "_Answer", oversample: int) -> int:
    """How far down the popularity order a list looks for its ``k * oversample`` unseen items:
    that many plus its seen and excluded ones, whatever else its batch holds."""
    return a.k * oversample + len(a.profile.seen) + len(a.exclude)


@dataclass
class RawMessage:
    """A message as consumed: where it came from and its bytes."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]


class CatalogBehind(RuntimeError):
    """A click names an item that the catalog may not have indexed yet: retry the batch later."""

    retriable = True


async def _none() -> None:
    """Nothing, as an awaitable (a read that is switched off)."""
    return None


async def together(*calls: Awaitable[Any]) -> list[Any]:
    """Await ``calls`` concurrently, their results in order. The first error is raised as it is
    (for the callers' retry to classify), once the other calls are cancelled and done."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _nothing() -> dict:
    return {}


def source_of(m: "RawMessage") -> str:
    return f"{m.topic}:{m.partition}"


def batch_extent(batch: Sequence["RawMessage"]) -> dict[str, int]:
    """Per source, the last offset in ``batch``."""
    out: dict[str, int] = {}
    for m in batch:
        src = source_of(m)
        out[src] = max(out.get(src, -1), m.offset)
    return out


@dataclass
class Output:
    """A processed batch: messages to publish (keyed recommendations and dead letters), and what
    :meth:`Pipeline.commit` writes after they are published."""

    recommendations: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[Optional[bytes], bytes]] = field(default_factory=list)
    effects: Effects = field(default_factory=Effects)
    writes: list[Write] = field(default_factory=list)
    catalog_progress: dict[int, int] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, int]:
        return self.effects.totals()

    def count(self, m: "RawMessage", name: str, n: int = 1) -> None:
        self.effects.count(source_of(m), m.offset, name, n)


class ItemCache:
    """Recently used items (with vectors), bounded in size and age: the least recently used go
    first, and an entry expires ``ttl_s`` after it was put. A plain ordered dict: a batch looks up
    every partner of its users' recent clicks here, thousands of items."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl, self._clock = size, ttl_s, clock
        self._d: OrderedDict[str, tuple[float, Candidate]] = OrderedDict()

    def get(self, item_id: str) -> Optional[Candidate]:
        return self.get_many((item_id,))[0].get(item_id)

    def get_many(self, item_ids: Iterable[str]) -> tuple[dict[str, Candidate], list[str]]:
        """The cached items of ``item_ids`` (distinct), and the ids not cached, in order."""
        now, d = self._clock(), self._d
        found: dict[str, Candidate] = {}
        missing: list[str] = []
        for i in item_ids:
            hit = d.get(i)
            if hit is None:
                missing.append(i)
            elif hit[0] <= now:  # expired
                del d[i]
                missing.append(i)
            else:
                d.move_to_end(i)
                found[i] = hit[1]
        return found, missing

    def put(self, c: Candidate) -> None:
        if self.size <= 0:
            return
        d = self._d
        d[c.item_id] = (self._clock() + self.ttl, c)
        d.move_to_end(c.item_id)
        while len(d) > self.size:
            d.popitem(last=False)

    def drop(self, item_id: str) -> None:
        self._d.pop(item_id, None)


def _clone(p: Profile) -> Profile:
    """A copy of ``p`` that applying events to leaves ``p`` as it was (vectors are replaced, never
    changed in place, so they are shared)."""
    c = copy.copy(p)
    c.scenes, c.interest, c.history = dict(p.scenes), dict(p.interest), list(p.history)
    c.explainers = [copy.copy(e) for e in p.explainers]
    c.seen = set(p.seen)
    c.applied = Applied(dict(p.applied.offsets), list(p.applied.recent), p.applied.count, p.applied.digest)
    return c


def _attrs(c: Candidate) -> tuple:
    return c.vector, c.title, c.category, c.scenes, c.available, c.no


class _SeenView:
    """The seen set as it was right after one event of a batch."""

    __slots__ = ("base", "added", "_all")

    def __init__(self, base: set[int], added: frozenset[int]) -> None:
        self.base, self.added = base, added
        self._all: Optional[set[int] | frozenset[int]] = None if added else base

    @property
    def all(self) -> set[int] | frozenset[int]:
        """One set of both, made on first use (for tests in loops: a set's own lookup)."""
        if self._all is None:
            self._all = self.base | self.added
        return self._all

    def __contains__(self, item: object) -> bool:
        return item in self.added or item in self.base

    def __len__(self) -> int:
        return len(self.base) + len(self.added)


@dataclass
class _Plan:
    """How one list's candidates are searched (:meth:`Pipeline._search`): ``limit`` unseen items
    wanted, ``probe`` hits asked of the first plain search, ``drop`` the items not to keep from it;
    a second search asks ``need`` hits, excluding ``drop`` in the index when ``owner`` is set (the
    id of a long seen set)."""

    limit: int
    only: tuple[str, ...]
    probe: int
    drop: Any  # a set of catalog numbers, or a _SeenView (whose .all a second search excludes)
    owner: Optional[int]
    need: int


def grouped_sums(groups: np.ndarray, nos: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partner sums of many lists at once: the distinct (group, catalog number) pairs, ascending,
    and the sum of ``vals`` over each, added in input order as a loop adds; counted where the
    pairs are dense, else sorted."""
    if not len(nos):
        return groups[:0], nos[:0], np.zeros(0)
    width = int(nos.max()) + 1
    keys = groups * width + nos
    if int(keys.max()) < 16 * len(keys):
        uniq = np.flatnonzero(np.bincount(keys))
        sums = np.bincount(keys, weights=vals)[uniq]
    else:
        uniq, inv = np.unique(keys, return_inverse=True)
        sums = np.bincount(inv, weights=vals, minlength=len(uniq))
    return uniq // width, uniq % width, sums


class _Row:
    """One source's partners: catalog numbers and scores, and (made on first use) a lookup."""

    __slots__ = ("nos", "vals", "_at")

    def __init__(self, nos: np.ndarray, vals: np.ndarray) -> None:
        self.nos, self.vals = nos, vals
        self._at: Optional[dict[int, float]] = None

    def value(self, no: int) -> Optional[float]:
        if self._at is None:
            self._at = dict(zip(self.nos.tolist(), self.vals.tolist()))
        return self._at.get(no)


class _Summed:
    """One list's behaviour scores: per partner item (by catalog number, ascending in ``nos``) its
    summed score over the list's sources (``parts``: each source's position, row and factor, rows
    scaled by ``scale(position)`` times the factor). Read through :class:`_Sums` and :class:`_From`
    for the few candidates a list ranks, not built per partner."""

    __slots__ = ("nos", "sums", "parts", "scale", "sources", "known", "_nos")

    def __init__(self, nos: np.ndarray, nos_list: list[int], sums: np.ndarray, parts: list[tuple[int, _Row, float]],
                 scale: Callable[[int], float], sources: list[str], known: dict[str, Candidate]) -> None:
        self.nos, self._nos, self.sums, self.parts, self.scale = nos, nos_list, sums, parts, scale
        self.sources, self.known = sources, known

    def index(self, item_id: str) -> int:
        """The item's position in ``nos``, -1 if no source gives it."""
        c = self.known.get(item_id)
        if c is None:
            return -1
        j = bisect.bisect_left(self._nos, c.no)
        return j if j < len(self._nos) and self._nos[j] == c.no else -1

    def total(self, j: int) -> float:
        return float(self.sums[j])

    def many(self, item_ids: Sequence[str]) -> np.ndarray:
        """The summed scores of ``item_ids`` (0 where no source gives one), as one array."""
        known = self.known
        nos = np.array([known[y].no if y in known else -1 for y in item_ids], dtype=np.int64)
        if not len(nos) or not len(self.nos):
            return np.zeros(len(nos))
        j = np.minimum(np.searchsorted(self.nos, nos), len(self.nos) - 1)
        return np.where(self.nos[j] == nos, self.sums[j], 0.0)

    def strongest(self, j: int) -> str:
        """The source giving item ``j`` most (the first of equals, in the sources' order)."""
        no = self._nos[j]
        best, best_v = -1, -math.inf
        for pos, row, f in self.parts:
            v = row.value(no)
            if v is not None and v * (self.scale(pos) * f) > best_v:
                best, best_v = pos, v * (self.scale(pos) * f)
        return self.sources[best]


class _Sums(Mapping[str, float]):
    """Item id -> its summed behaviour score (a :class:`_Summed` read by id)."""

    __slots__ = ("s",)

    def __init__(self, s: _Summed) -> None:
        self.s = s

    def __getitem__(self, y: str) -> float:
        j = self.s.index(y)
        if j < 0:
            raise KeyError(y)
        return self.s.total(j)

    def get(self, y: str, default: Any = None) -> Any:
        j = self.s.index(y)
        return self.s.total(j) if j >= 0 else default

    def __contains__(self, y: object) -> bool:
        return isinstance(y, str) and self.s.index(y) >= 0

    def many(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.s.many(item_ids)

    def __iter__(self):
        ids = {c.no: i for i, c in self.s.known.items()}
        return iter([ids[n] for n in self.s.nos.tolist()])

    def __len__(self) -> int:
        return len(self.s.nos)


class _From(_Sums):
    """Item id -> the title of the click that gives it most, looked up only when a reason asks."""

    __slots__ = ()

    def __getitem__(self, y: str) -> str:
        j = self.s.index(y)
        if j < 0:
            raise KeyError(y)
        x = self.s.strongest(j)
        known = self.s.known
        return known[x].title or x if x in known else x

    def get(self, y: str, default: Any = None) -> Any:
        return self[y] if y in self else default


class _Fresh:
    """A batch's own clicks, for the co-clicks and steps that a list made later in the batch sees:
    the store's rows are as they were before the batch, and each list adds to them the clicks at
    earlier positions of the batch, as the store will count them once applied (a co-click with
    each of the clicker's earlier clicks, a step 1 / gap from each; co-clicks over the square root
    of both items' clicks, steps over the clicks of the item stepped from). Only other users'
    clicks add partners: a user's own clicks add items that user has seen. Every click counts in
    its item's clicks."""

    def __init__(self, clicks: Sequence[tuple[int, str, ClickEffect]], size: int, nos: Mapping[str, int]) -> None:
        # item -> (position, user, partner, raw count), by position: co-clicked items, next-clicked ones
        self.co: dict[str, list[tuple[int, str, str, float]]] = {}
        self.tr: dict[str, list[tuple[int, str, str, float]]] = {}
        clicks = sorted(clicks, key=lambda qc: qc[0])
        for q, user, c in clicks:
            for x in dict.fromkeys(c.previous):
                if x != c.item_id:
                    self.co.setdefault(x, []).append((q, user, c.item_id, 1.0))
                    self.co.setdefault(c.item_id, []).append((q, user, x, 1.0))
            for x, w in transition_weights(c):
                self.tr.setdefault(x, []).append((q, user, c.item_id, w))
        self.items = list(dict.fromkeys(c.item_id for _, _, c in clicks))  # the items clicked, a row each
        self.row = {item: j for j, item in enumerate(self.items)}
        # before[j, p]: item j's clicks at positions below p
        at = np.zeros((len(self.items), size + 1))
        for q, _, c in clicks:
            at[self.row[c.item_id], q + 1] += 1
        self.before = np.cumsum(at, axis=1)
        self._before = self.before.tolist()  # for reads one at a time
        by_no = sorted((nos[item], j) for item, j in self.row.items() if item in nos)
        self.clicked_nos = np.array([no for no, _ in by_no], dtype=np.int64)  # ascending
        self.rows_by_no = np.array([j for _, j in by_no], dtype=np.int64)
        self.counts: Mapping[str, float] = {}  # items' clicks in the store (know)
        self.stored = np.zeros(len(self.items))  # the same, of the clicked items by row

    def know(self, counts: Mapping[str, float]) -> None:
        """Items' clicks as stored before the batch: the clicked ones and those that :meth:`added` names."""
        self.counts = counts
        self.stored = np.array([counts.get(item, 0.0) for item in self.items])

    def clicks_before(self, item_id: str, position: int) -> float:
        j = self.row.get(item_id)
        return 0.0 if j is None else self._before[j][position]

    def grown(self, position: int, item_id: str, co: bool) -> float:
        """What the stored scores of ``item_id`` are multiplied by where they are divided by its
        clicks (the square root for co-clicks): its clicks as stored over its clicks by ``position``."""
        j = self.row.get(item_id)
        if j is None:
            return 1.0
        k, n = self._before[j][position], float(self.stored[j])
        if not k or n <= 0:
            return 1.0
        return math.sqrt(n / (n + k)) if co else n / (n + k)

    def regrown(self, nos: np.ndarray, sums: np.ndarray, position: int) -> np.ndarray:
        """Co-click sums by partner (catalog numbers ``nos``, ascending) over the partners' clicks
        by ``position``: each stored score is over the square root of its partner's clicks."""
        if position < 0 or not len(self.clicked_nos):
            return sums
        hit = np.flatnonzero(np.isin(nos, self.clicked_nos))
        if not len(hit):
            return sums
        j = self.rows_by_no[np.searchsorted(self.clicked_nos, nos[hit])]
        k, n = self.before[j, position], self.stored[j]
        grow = (k > 0) & (n > 0)
        if not grow.any():
            return sums
        out = sums.copy()
        out[hit[grow]] *= np.sqrt(n[grow] / (n[grow] + k[grow]))
        return out

    def added(self, kind: str, a: "_Answer", sources: list[str]) -> list[tuple[int, str, str, float]]:
        """(source's place in ``sources``, source, partner, raw count) added for list ``a``."""
        out: list[tuple[int, str, str, float]] = []
        if a.position < 0:
            return out
        table = self.co if kind == "cooccur" else self.tr
        for pos, x in enumerate(sources):
            for q, user, y, w in table.get(x, ()):
                if q >= a.position:
                    break
                if user != a.user_id:
                    out.append((pos, x, y, w))
        return out

    def adjust(self, kind: str, a: "_Answer", sources: list[str], adds: Sequence[tuple[int, str, str, float]]
               ) -> tuple[dict[int, float], list[tuple[int, dict[str, float]]]]:
        """For list ``a`` (after :meth:`know`): the factor of each stored row whose source was
        clicked earlier in the batch, by the source's place, and the scores ``adds``
        (:meth:`added`) gives each source's partners, as the store will count them."""
        co, where, counts = kind == "cooccur", a.position, self.counts
        factors = {pos: f for pos, x in enumerate(sources) if x in self.row and (f := self.grown(where, x, co)) != 1.0}
        rows: dict[int, dict[str, float]] = {}
        n_of: dict[str, float] = {}
        for pos, x, y, w in adds:
            if (nx := n_of.get(x)) is None:
                nx = n_of[x] = counts.get(x, 0.0) + self.clicks_before(x, where)
            if co:
                # a partner with stored clicks is put over its clicks by then with the stored
                # scores (regrown), one without over its clicks in the batch
                ny = counts.get(y, 0.0) or self.clicks_before(y, where)
                if nx <= 0 or ny <= 0:
                    continue
                v = w / math.sqrt(nx * ny)
            elif nx > 0:
                v = w / nx
            else:
                continue
            row = rows.setdefault(pos, {})
            row[y] = row.get(y, 0.0) + v
        return factors, sorted(rows.items())


@dataclass
class _Answer:
    """A list to produce: for an event (after applying it) or a request."""

    user_id: str
    trigger_id: str
    trigger_type: str
    scene: Optional[str]
    event_time: float
    k: int
    profile: Profile  # a snapshot
    duplicate: bool = False
    exclude: frozenset[str] = frozenset()
    only_categories: tuple[str, ...] = ()
    vector: Optional[np.ndarray] = None
    clicked: int = -1  # the catalog number a newly applied click picked (what the last list is judged by)
    impression: Impression = field(default_factory=Impression)
    position: int = -1  # the event's place in its batch (-1: a request)


class Pipeline:
    """The stream processing core, bound to its stores and encoder.

    Args:
        profiles: the profile store.
        items: the item index.
        encoder: any object with ``encode(texts) -> (n, dim) array`` and ``version``.
        params: model parameters.
        limits: input limits.
        k: default list length.
        item_cache: cache of items with vectors.
        executor: where blocking calls (encoder, item index) run.
        clock: wall clock for produced times and the future-timestamp check.
        catalog_caught_up: says whether the catalog is indexed up to its end; a click on an
            unknown item is dead-lettered only then (``None``: always).
        metrics: where the time of each stage adds up (``streams.metrics``).
    """

    def __init__(self, profiles: ProfileStore, items: ItemIndex, encoder: Any, params: ModelParams,
                 limits: Limits, k: int = 10, item_cache: Optional[ItemCache] = None,
                 executor: Optional[Executor] = None, clock: Callable[[], float] = time.time,
                 catalog_caught_up: Optional[Callable[[], Awaitable[bool]]] = None,
                 metrics: Optional[Metrics] = None) -> None:
        self.metrics = metrics or Metrics()
        # every store and encoder call counts in its stage's time (streams.metrics)
        self.profiles = Timed(profiles, self.metrics, "redis")
        self.items = Timed(items, self.metrics, "milvus")
        self.encoder = Timed(encoder, self.metrics, "encoder")
        self.params, self.limits, self.k = params, limits, k
        self.cache = item_cache or ItemCache(50_000, 60.0)
        self.executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="streamrec-io")
        # one encoder job at a time; a batch's own texts before those encoded ahead for the next
        self._encode_executor = PriorityExecutor("streamrec-encode")
        self.clock = clock
        self.catalog_caught_up = catalog_caught_up
        self._next: dict[str, int] = {}  # per source, the offset after this worker's last batch
        self._redo: dict[str, int] = {}  # a batch to take again: per source, its last offset
        self._applied: dict[str, int] = {}  # per source, the published offset read with it
        self._prefetched: dict[tuple[str, ...], asyncio.Future] = {}  # an encoder chunk's texts -> its encoding, begun early
        self._query_texts: dict[tuple[str, int, int], Optional[str]] = {}  # a held message's query text, once parsed
        self._prefetch_keep = PREFETCH_CHUNKS  # chunks kept encoded ahead, at most
        # The index searches of the batch expected next, done while this one runs (:meth:`_look_ahead`)
        self.upcoming: Optional[Callable[[], Sequence[RawMessage]]] = None  # the events held behind the batch
        self._index_gen = 0  # +1 at the start and at the end of every write to the item index
        self._index_writing = 0  # writes to the item index under way
        self._ahead_task: Optional[asyncio.Task] = None  # the search ahead begun by the running batch
        self._ahead_pending: Optional[asyncio.Task] = None  # the one begun by the batch before it
        self._ahead_hits: tuple[int, dict[tuple, list[Candidate]]] = (-1, {})  # (index generation, hits by key)
        self._searched: Optional[asyncio.Future] = None  # set once the running batch's own searches are done
        self.closers: list[Callable[[], Any]] = []  # what else :meth:`close` closes (e.g. a gate's client)

    async def peek_user(self, user_id: str) -> tuple[Profile, dict[str, str], dict[str, float]]:
        """A user's stored profile, the titles of the items in their recent history, and their
        interest distribution over the catalog's categories, for the live page (reads only,
        outside the stage timings)."""
        store = self.profiles._target
        profile = (await store.load([user_id]))[user_id]
        ids = [h["item_id"] for h in profile.history[-12:] if h.get("type") == "click" and h.get("item_id")]
        rows = await self._run(self.items._target.get, ids) if ids else {}
        dist = interest_distribution(profile, await store.category_count(), self.params)
        return profile, {i: c.title for i, c in rows.items() if c.title}, dist

    async def close(self) -> None:
        """Close the stores, the other clients given in ``closers`` and the thread pools (at
        shutdown, once no batch runs). Each is closed even if another fails."""
        async def _items() -> None:
            self.items.close()

        for close in (self.profiles.close, _items, *self.closers):
            try:
                got = close()
                if asyncio.iscoroutine(got):
                    await got
            except Exception:  # noqa: BLE001 - the rest still close
                log.warning("closing %r failed", close, exc_info=True)
        for job in self._prefetched.values():
            job.cancel()
        self._prefetched.clear()
        for task in (self._ahead_task, self._ahead_pending):
            if task is not None:
                task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._encode_executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable, *args: Any, encoder: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encode_executor if encoder else self.executor, fn, *args)

    # -- catalog -------------------------------------------------------------------------------

    async def _encode_catalog(self, texts: list[str]) -> np.ndarray:
        """Encode catalog texts one encoder batch at a time: the encoder runs one job at a time, in
        order, so a query's text waits behind at most one catalog chunk, not a whole catalog batch.
        Chunks are the encoder's own batches, so the vectors are the same as in one call."""
        parts = [await self._run(self.encoder.encode, list(chunk), encoder=True) for chunk in self._chunks(texts)]
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), dtype=np.float32)

    async def _index_write(self, fn: Callable, *args: Any) -> None:
        """A write to the item index; searches done ahead before or during it are not used after it."""
        self._index_gen += 1
        self._index_writing += 1
        try:
            await self._run(fn, *args)
        finally:
            self._index_writing -= 1
            self._index_gen += 1

    async def process_catalog(self, batch: Sequence[RawMessage]) -> Output:
        """Number, encode and index upserted items, remove deleted ones (all idempotent)."""
        out = Output()
        now = self.clock()
        last: dict[str, tuple[RawMessage, ItemUpsert | ItemDelete]] = {}
        for m in batch:
            out.catalog_progress[m.partition] = max(m.offset, out.catalog_progress.get(m.partition, -1))
            try:
                rec = parse_catalog(m.value, self.limits, now)
            except InvalidMessage as exc:
                out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
                out.count(m, "dead_letters")
                continue
            last.pop(rec.item_id, None)
            last[rec.item_id] = (m, rec)  # the last operation on an item wins
        upserts = [(m, r) for m, r in last.values() if isinstance(r, ItemUpsert)]
        deletes = [(m, r) for m, r in last.values() if isinstance(r, ItemDelete)]
        if upserts:
            numbers = await self.profiles.number_items([r.item_id for _, r in upserts])
            vectors = await self._encode_catalog([r.text() for _, r in upserts])
            rows = [ItemRow(r.item_id, v, r.title, r.category, tuple(r.scenes), r.available, r.timestamp,
                            numbers[r.item_id]) for (_, r), v in zip(upserts, vectors, strict=True)]
            await self._index_write(self.items.upsert, rows)
            await self.profiles.add_items([(r.item_id, r.timestamp, r.category) for _, r in upserts if r.available])
            unavailable = [r.item_id for _, r in upserts if not r.available]
            if unavailable:
                await self.profiles.remove_items(unavailable)
            for m, _ in upserts:
                out.count(m, "items_upserted")
        if deletes:
            ids = [r.item_id for _, r in deletes]
            await self._index_write(self.items.delete, ids)
            await self.profiles.remove_items(ids)
            for m, _ in deletes:
                out.count(m, "items_deleted")
        for item_id in last:
            self.cache.drop(item_id)
        return out

    # -- events --------------------------------------------------------------------------------

    async def process_events(self, batch: Sequence[RawMessage]) -> Output:
        """Apply clicks and queries to profiles (in memory) and make one list per valid event."""
        self._ahead_pending, self._ahead_task = self._ahead_task, None  # the searches done ahead for this batch
        try:
            return await self._process_events(batch)
        except BaseException:
            if self._ahead_task is not None:  # begun for a batch after this one: taken again as it was
                self._ahead_task.cancel()
                self._ahead_task = None
            raise
        finally:
            self._searches_done()  # also for a batch with no search of its own

    async def _process_events(self, batch: Sequence[RawMessage]) -> Output:
        out = Output()
        now = self.clock()
        events: list[tuple[RawMessage, Click | Query | ForgetUser]] = []
        with self.metrics.stage("parse"):
            for m in batch:
                out.count(m, "events_in")
                try:
                    events.append((m, parse_event(m.value, self.limits, now)))
                except InvalidMessage as exc:
                    out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
                    out.count(m, "dead_letters")

        items = await self.fetch_items([e.item_id for _, e in events if isinstance(e, Click)])
        unknown = [e.item_id for _, e in events if isinstance(e, Click) and e.item_id not in items]
        if unknown and self.catalog_caught_up is not None:
            if not await self.catalog_caught_up():
                raise CatalogBehind(f"{len(unknown)} clicks name items that are not indexed (e.g. {unknown[0]!r}) "
                                    f"while the catalog is still being indexed: waiting for it")
            items.update(await self.fetch_items(unknown))  # indexed since they were looked up
        valid: list[tuple[RawMessage, Click | Query | ForgetUser]] = []
        for m, e in events:
            if isinstance(e, Click) and e.item_id not in items:
                out.dead_letters.append(self.dead_letter(m, "unknown_item", f"item {e.item_id!r} is not in the catalog"))
                out.count(m, "dead_letters")
            else:
                valid.append((m, e))
        queries = [e for _, e in valid if isinstance(e, Query)]
        qvecs = await self._encode_queries([q.text for q in queries]) if queries else []
        query_vectors = {q.event_id: v for q, v in zip(queries, qvecs, strict=True)}

        by_user: dict[str, list[tuple[RawMessage, Click | Query | ForgetUser]]] = {}
        for m, e in valid:
            by_user.setdefault(e.user_id, []).append((m, e))
        # the batch is noted before any list is out, so that a worker that stops before the effects
        # takes this batch again as it was; a batch whose effects were applied had its lists out:
        # they go again marked. Lists see the ranker's weights as they were before this batch.
        profiles, published, model = await together(
            self.load_profiles(list(by_user)), self.profiles.begin(batch_extent(batch)) if valid else _nothing(),
            self.profiles.model())
        flat: list[tuple[RawMessage, _Answer]] = []
        sequences: dict[str, list[tuple[RawMessage, Optional[_Answer]]]] = {}
        shown = {u: prof.shown for u, prof in profiles.items()}
        position = {id(m): j for j, m in enumerate(batch)} if self.params.fresh_behaviour else {}
        for u, user_events in by_user.items():
            for (m, _), a in zip(user_events, self._apply_user(profiles[u], user_events, items, query_vectors, out),
                                 strict=True):
                sequences.setdefault(u, []).append((m, a))
                if a is not None:
                    a.duplicate = a.duplicate or m.offset <= published.get(source_of(m), -1)
                    a.position = position.get(id(m), -1)
                    flat.append((m, a))
        fresh: Optional[_Fresh] = None
        if self.params.fresh_behaviour:
            clicker = {(source_of(m), m.offset): (position[id(m)], e.user_id) for m, e in valid}
            fresh = _Fresh([(*clicker[src, offset], c) for src, offset, c in out.effects.clicks], len(batch),
                           {c.item_id: c.no for c in items.values()})
        self._look_ahead({**profiles, **{w.profile.user_id: w.profile for w in out.writes}})  # a forget makes a new one
        # Lists see popularity, co-clicks, steps and the ranker's weights as they were before this
        # batch (with ``fresh_behaviour``, co-clicks and steps with the batch's earlier clicks:
        # _Fresh): never a click that comes after their event.
        ids = {c.no: c.item_id for c in items.values()}
        weights = weights_from(model, self.params)
        for (m, _), (user, payload) in zip(flat, await self.answer([a for _, a in flat], ids, weights, fresh),
                                           strict=True):
            out.recommendations.append((user.encode(), payload))
            out.count(m, "recommendations_out")
        self._learn(sequences, shown, weights, out)
        return out

    @property
    def _encode_step(self) -> int:
        """Texts per encoder call: the encoder's own batch, so chunks encode as one call would."""
        return max(1, int(getattr(self.encoder, "batch_size", 0) or 64))

    def prefetch(self, batch: Sequence[RawMessage], whole: bool = True) -> None:
        """Start encoding the query texts of ``batch``, the events held for the next events batch,
        while the current one runs, one encoder chunk at a time (the encoder's own batches, after
        any text a running batch waits for). With ``whole`` the next batch is exactly ``batch``;
        otherwise it may take more events, so only full chunks are begun. A batch takes a chunk's
        vectors only for exactly its texts in that chunk, the encoder's own batch, so they are
        the vectors its own call would give; otherwise, or if the call failed, it encodes them.
        Only messages that spell ``"query"`` are parsed here (a query spelled otherwise is encoded
        with its batch), each once."""
        now = self.clock()
        if len(self._query_texts) > 4 * len(batch) + 1024:
            self._query_texts.clear()
        texts = []
        for m in batch:
            if not m.value or b'"query"' not in m.value:  # not a query as clients write one: no parse
                continue
            at = (m.topic, m.partition, m.offset)
            if at not in self._query_texts:
                try:
                    e = parse_event(m.value, self.limits, now)
                except InvalidMessage:
                    e = None
                self._query_texts[at] = e.text if isinstance(e, Query) else None
            if self._query_texts[at] is not None:
                texts.append(self._query_texts[at])
        step = self._encode_step
        self._prefetch_keep = max(self._prefetch_keep, 2 * -(-len(batch) // step))
        chunks = self._chunks(texts)
        if not whole and chunks and len(chunks[-1]) < step:  # the next batch may add to it
            chunks.pop()
        for key in chunks:
            if key in self._prefetched:
                continue
            while len(self._prefetched) >= self._prefetch_keep:  # their batches went otherwise
                self._prefetched.pop(next(iter(self._prefetched))).cancel()
            job = asyncio.wrap_future(self._encode_executor.submit_at(LATER, self.encoder.encode, list(key)))
            job.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is seen by its batch
            self._prefetched[key] = job

    def _chunks(self, texts: Sequence[str]) -> list[tuple[str, ...]]:
        step = self._encode_step
        return [tuple(texts[i:i + step]) for i in range(0, len(texts), step)]

    async def _encode_queries(self, texts: list[str]) -> np.ndarray:
        """The batch's query vectors: chunks encoded ahead (:meth:`prefetch`) where their texts are
        exactly the chunk's, the other chunks now."""
        jobs: list[Awaitable[np.ndarray]] = []
        for chunk in self._chunks(texts):
            job = self._prefetched.pop(chunk, None)
            self.metrics.prefetched.labels("miss" if job is None else "hit").inc(len(chunk))
            jobs.append(self._prefetched_or_now(job, chunk))
        return np.concatenate(await asyncio.gather(*jobs))

    async def _prefetched_or_now(self, job: Optional[asyncio.Future], chunk: tuple[str, ...]) -> np.ndarray:
        if job is not None:
            try:
                return await job
            except Exception:  # noqa: BLE001 - encoded again below; its error, if any, raised there
                log.debug("a prefetched query encoding failed; encoding again", exc_info=True)
        return await self._run(self.encoder.encode, list(chunk), encoder=True)

    def _learn(self, sequences: dict[str, list[tuple[RawMessage, Optional["_Answer"]]]],
               shown: dict[str, Impression], weights: np.ndarray, out: Output) -> None:
        """Each newly applied click judges the list shown before it (the stored impression, or the
        list of the user's previous event in this batch): a step for the ranker's weights, tagged
        with the click's source and offset. The user's last list becomes the stored impression."""
        writes = {w.profile.user_id: w for w in out.writes}
        for u, seq in sequences.items():
            last = shown.get(u, Impression())
            for m, a in seq:
                if a is None:  # forgotten: nothing shown is remembered
                    last = Impression()
                    continue
                if a.clicked >= 0 and not a.duplicate:
                    step = pairwise_step(last, a.clicked, weights, self.params)
                    if step is not None:
                        out.effects.learn.append((source_of(m), m.offset, step))
                last = a.impression
            if u in writes and not writes[u].forgotten:
                writes[u].profile.shown = last

    async def next_batch(self, held: Sequence[RawMessage], size: int, force: bool = False) -> Optional[list[int]]:
        """Which of ``held`` (indexes, in order) the next events batch takes: the first ``size``, or,
        where a batch was begun and its effects were not applied (its worker stopped between the
        two), that batch again, so that the same events on the same state make the same lists:
        first the redelivered events before it (applied already), then exactly its events.
        ``None``: some of that batch is not held yet (wait for it; ``force`` takes what is held).
        A source that continues where this worker's last batch left it is not looked up."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for m in held:
            src = source_of(m)
            first.setdefault(src, m.offset)
            last[src] = max(last.get(src, -1), m.offset)
        unsure = [src for src, o in first.items() if self._next.get(src) != o and src not in self._applied]
        if unsure:
            pos = await self.profiles.positions(unsure)
            for src, (applied, begun) in pos.items():
                self._applied[src] = applied
                if begun.get(src, -1) > applied:
                    for other, end in begun.items():
                        self._redo[other] = max(self._redo.get(other, -1), end)
            others = [src for src in self._redo if src not in self._applied]
            if others:
                self._applied.update({src: applied for src, (applied, _) in
                                      (await self.profiles.positions(others)).items()})
        take: list[int] = []
        if self._redo:
            # events applied already go first, by themselves: the batch to take again is only its own
            take = [i for i, m in enumerate(held) if m.offset <= self._applied.get(source_of(m), -1)]
            if not take:
                missing = {src: end for src, end in self._redo.items()
                           if self._applied[src] < end and last.get(src, -1) < end}
                if missing and not force:
                    return None
                take = [i for i, m in enumerate(held) if m.offset <= self._redo.get(source_of(m), -1)]
                log.warning("taking again a batch whose lists may be out but whose effects are not applied "
                            "(%d events): %s%s", len(take),
                            ", ".join(f"{src} to {end}" for src, end in sorted(self._redo.items())),
                            f"; without the events not received in time: {missing}" if missing else "")
                self._redo.clear()
        if not self._redo:
            self._applied.clear()
        if not take:
            take = list(range(min(size, len(held))))
        for i in take:
            src = source_of(held[i])
            self._next[src] = max(self._next.get(src, 0), held[i].offset + 1)
        return take

    def lose_positions(self) -> None:
        """Forget where the last batches left each source (partitions moved: another worker may have
        begun a batch on one)."""
        self._next.clear()
        self._redo.clear()
        self._applied.clear()

    async def load_profiles(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """Profiles ready to use: an unreadable one starts again, one whose vectors another encoder
        made keeps everything but them (both logged), click explainers get their item vectors."""
        profiles = await self.profiles.load(user_ids) if user_ids else {}
        version = self.encoder.version
        for u, prof in profiles.items():
            if prof.reset:
                log.warning("profile of user %r could not be read (%s); it starts again", u, prof.reset)
            elif prof.encoder and prof.encoder != version:
                log.warning("profile of user %r holds vectors of encoder %r, this worker's is %r: its vectors "
                            "start again, its history and seen items are kept", u, prof.encoder, version)
                prof.long = prof.short = prof.intent = None
                prof.intent_strength = 0.0
                prof.scenes = {}
                prof.explainers = [e for e in prof.explainers if e.kind == "click"]
        refs = [e.ref for prof in profiles.values() for e in prof.explainers if e.vector is None]
        if refs:
            known = await self.fetch_items(refs)
            for prof in profiles.values():
                prof.explainers = [e if e.vector is not None else
                                   Explainer(e.kind, e.label, e.ref, known[e.ref].vector)
                                   for e in prof.explainers if e.vector is not None or
                                   (e.ref in known and known[e.ref].vector is not None)]
        return profiles

    def _apply_user(self, profile: Profile, user_events: list, items: dict[str, Candidate],
                    query_vectors: dict[str, np.ndarray], out: Output) -> list[Optional[_Answer]]:
        """Apply one user's events in order (in memory), noting the write and the per-item effects
        in ``out``; return the lists to make (``None`` for a forget)."""
        p = self.params
        answers: list[Optional[_Answer]] = []
        expected, reset = profile.version, bool(profile.reset)
        base_seen = set(profile.seen)
        added: list[int] = []
        changed = reset
        forgotten = False
        for m, e in user_events:
            src = Applied.source(m.topic, m.partition)
            if profile.applied.seen_before(src, m.offset, e.event_id):
                again = m.offset <= profile.applied.offsets.get(src, -1)
                out.count(m, "redelivered" if again else "duplicates")
                duplicate = True
            elif isinstance(e, ForgetUser):
                applied = profile.applied
                applied.count = applied.digest = 0
                applied.record(src, m.offset, e.event_id, p.recent_events)
                profile = Profile(user_id=e.user_id, version=profile.version, applied=applied)
                base_seen, added = set(), []
                changed = forgotten = True
                out.count(m, "users_forgotten")
                answers.append(None)  # a forgotten user gets no list
                continue
            else:
                duplicate = False
                if isinstance(e, Click):
                    it = items[e.item_id]
                    earlier = [h["item_id"] for h in profile.history if h["type"] == "click"][-p.cooccur_window:]
                    if it.available:  # an unavailable item gains no popularity and no co-clicks
                        out.effects.clicks.append((source_of(m), m.offset, ClickEffect(
                            it.item_id, e.scene, e.timestamp, e.weight, earlier)))
                    apply_click(profile, it.item_id, it.no, it.vector, it.title, it.category, e.scene,
                                click_strength(e.weight, e.dwell_s, p), e.timestamp, p)
                    if it.no not in base_seen:
                        added.append(it.no)
                else:
                    apply_query(profile, e.text, query_vectors[e.event_id], e.scene, e.event_id, e.timestamp, p)
                codec.canonical(profile)
                profile.applied.record(src, m.offset, e.event_id, p.recent_events)
                out.count(m, "events_applied")
                changed, forgotten = True, False
            if isinstance(e, ForgetUser):
                answers.append(None)
                continue
            snap = copy.copy(profile)  # vectors are replaced, never changed in place; containers are copied
            snap.scenes = dict(profile.scenes)
            snap.interest = dict(profile.interest)
            snap.explainers = list(profile.explainers)
            snap.history = list(profile.history)
            snap.seen = _SeenView(base_seen, frozenset(added))  # type: ignore[assignment]
            answers.append(_Answer(e.user_id, e.event_id, "click" if isinstance(e, Click) else "query", e.scene,
                                   e.timestamp, self.k, snap, duplicate=duplicate,
                                   clicked=items[e.item_id].no if isinstance(e, Click) and not duplicate else -1))
        if changed:
            profile.encoder = self.encoder.version
            out.writes.append(Write(profile, expected, forgotten=forgotten, replace=reset))
            if reset:
                out.count(user_events[0][0], "profiles_reset")
        return answers

    async def commit(self, out: Output) -> None:
        """Apply a published batch's effects, then write its profiles (raises
        :class:`ConflictError` if another writer changed one: process the batch again)."""
        await self.profiles.apply(out.effects)
        if out.writes:
            done = await self.profiles.commit(out.writes)
            if not all(done):
                raise ConflictError(f"profiles of {done.count(False)} users changed during the batch")
        if out.catalog_progress:
            await self.profiles.set_catalog_progress(out.catalog_progress)

    # -- requests ------------------------------------------------------------------------------

    async def process_requests(self, batch: Sequence[RawMessage]) -> Output:
        """Answer recommendation requests from current profiles, changing nothing."""
        out = Output()
        now = self.clock()
        reqs: list[tuple[RawMessage, RecommendationRequest]] = []
        for m in batch:
            try:
                reqs.append((m, parse_request(m.value, self.limits, now)))
            except InvalidMessage as exc:
                out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
                out.count(m, "dead_letters")
        profiles = await self.load_profiles([r.user_id for _, r in reqs])
        answers = [_Answer(r.user_id, r.request_id, "request", r.scene, r.timestamp, r.k or self.k,
                           profiles[r.user_id], exclude=frozenset(r.exclude), only_categories=tuple(r.categories))
                   for _, r in reqs]
        weights = weights_from(await self.profiles.model(), self.params) if answers else None
        for (m, _), (user, payload) in zip(reqs, await self.answer(answers, weights=weights), strict=True):
            out.recommendations.append((user.encode(), payload))
            out.count(m, "requests_answered")
        return out

    # -- shared --------------------------------------------------------------------------------

    async def fetch_items(self, item_ids: Sequence[str]) -> dict[str, Candidate]:
        """Items with vectors, from the cache or the index."""
        found, missing = self.cache.get_many(dict.fromkeys(item_ids))
        if missing:
            for i, c in (await self._run(self.items.get, missing)).items():
                self.cache.put(c)
                found[i] = c
        return found

    async def answer(self, answers: Sequence[_Answer], ids: Optional[dict[int, str]] = None,
                     weights: Optional[np.ndarray] = None, fresh: Optional[_Fresh] = None) -> list[tuple[str, bytes]]:
        """Rank a list for each answer: one batched search for all personalised ones, the
        cold-start list (popularity, then newest) for the rest and to fill short lists; each as
        (user id, the wire bytes of its ``Recommendations``). ``ids``:
        the item ids of the catalog numbers clicked in the batch; ``weights``: the ranker's (the
        defaults when None); ``fresh``: the batch's clicks, for co-clicks and steps. Each answer's
        ``impression`` is set to what its list remembers."""
        ids = ids or {}
        if not answers:
            return []
        p = self.params
        off = p.off
        n_categories = await self.profiles.category_count()
        for a in answers:
            a.vector = query_vector(a.profile, a.scene, p)
        results: dict[int, list[Candidate]] = {}
        # Every list is ranked from the same candidates however it is batched: the best
        # ``limits[i]`` items by cosine among those unseen when the list is made. Each list first
        # takes them from one plain batched search that over-fetches a little (``_search``); a list
        # whose unseen items fall short searches again: a small seen set over-fetched by its size,
        # a large one excluded in the index, once for all of its user's lists in the batch (the
        # seen set after the whole batch is excluded, and the items the user clicks later in the
        # batch, unseen when an earlier list is made, join that list's candidates, scored here).
        plans, late, limits = self._plans(answers, ids)
        if "text" in off:  # ablation: no candidates by text (the vectors still tell who is personalised)
            plans, late = {}, {}
        # The index searches run beside the store reads that do not need their results (behaviour
        # partners, popular pools); what each read brings is merged below in a fixed order.
        scenes = list(dict.fromkeys(a.scene for a in answers))
        kinds = [kind for kind in ("cooccur", "transitions") if kind not in off]
        found, (reading, behaviour_items), pools = await together(
            self._search(answers, plans), self._behaviour_read(answers, kinds, fresh),
            self._popular_pools(scenes, POPULAR_READ))
        # A list takes the first ``k * oversample`` unseen popular items within its own bound; a
        # scene whose read leaves some list short is read four times as far, up to that bound.
        while True:
            further: dict[Optional[str], int] = {}
            for a in answers:
                bound, pool = popular_bound(a, p.oversample), pools[a.scene]
                if not pool.covers(bound) and sum(1 for _ in itertools.islice(
                        pool.unseen(a.profile.seen, a.exclude, bound), a.k * p.oversample)) < a.k * p.oversample:
                    further[a.scene] = max(further.get(a.scene, 0), min(bound, 4 * pool.read))
            if not further:
                break
            again = await together(*(self._popular_pool(scene, n) for scene, n in further.items()))
            pools.update(zip(further, again, strict=True))
        for i, hits in found.items():
            seen = answers[i].profile.seen
            results[i] = [c for c in hits if c.no not in seen][: limits[i]]
        if late:
            known = await self.fetch_items([c for ids in late.values() for c in ids])
            for i, ids in late.items():
                rows = [known[c] for c in ids if c in known and known[c].vector is not None and known[c].available
                        and (not answers[i].only_categories or known[c].category in answers[i].only_categories)]
                if rows:
                    # exactly the search over everything unseen at this list: the best ``limit`` of
                    # both, so a later click is a candidate only where the index would have had it
                    sims = np.stack([c.vector for c in rows]) @ answers[i].vector
                    merged = results[i] + [Candidate(c.item_id, float(v), *_attrs(c)) for c, v in zip(rows, sims)]
                    merged.sort(key=lambda c: (-c.similarity, c.item_id))
                    results[i] = merged[: limits[i]]
        bare = [c.item_id for hits in results.values() for c in hits if c.vector is None]
        if bare:  # the index returned ids and scores only: add vectors and attributes
            known = await self.fetch_items(bare)
            for i, hits in results.items():
                results[i] = [c if c.vector is not None else
                              Candidate(c.item_id, c.similarity, *_attrs(known[c.item_id]))
                              for c in hits if c.vector is not None or c.item_id in known]
        # Items clicked with, and right after, the user's recent clicks join the candidates.
        signals: dict[int, Signals] = {i: Signals() for i, a in enumerate(answers) if a.vector is not None}
        for kind in kinds:
            self._behaviour_candidates(answers, results, signals, kind, *reading[kind], behaviour_items, fresh)
        # Popular items join every personalised list's candidates (and fill the cold-start lists).
        if "popularity" not in off:
            for i in signals:
                a = answers[i]
                extra = itertools.islice(pools[a.scene].unseen(a.profile.seen, a.exclude, popular_bound(a, p.oversample)),
                                         a.k * p.oversample)
                results[i] = results.get(i, []) + list(extra)  # ranking takes their cosines from their vectors
        newest: Optional[_Popular] = None  # read only when a list needs filling
        produced: list[tuple[str, bytes]] = []
        if signals:  # how thin each candidate's behaviour is, and how popular
            by_scene: dict[Optional[str], set[str]] = {}
            for i in signals:
                by_scene.setdefault(answers[i].scene, set()).update(c.item_id for c in results.get(i, ()))
            want_pop = {scene: sorted(ids) for scene, ids in by_scene.items()} if "popularity" not in off else {}
            clicks, pop_of = await together(
                self.profiles.item_clicks(sorted(set().union(*by_scene.values())), max(a.event_time for a in answers))
                if "text" not in off else _none(),
                self.profiles.popularity_many(want_pop, POPULAR_READ) if want_pop else _nothing())
            for i, sig in signals.items():
                if clicks is not None:
                    sig.item_clicks = clicks
                if answers[i].scene in pop_of:
                    sig.popularity = pop_of[answers[i].scene]
        personal = [i for i, a in enumerate(answers) if a.vector is not None]
        with self.metrics.stage("ranking"):
            lists = dict(zip(personal, rank_many(
                [Job(answers[i].profile, results.get(i, []), answers[i].k, answers[i].scene, answers[i].exclude,
                     answers[i].only_categories, signals[i], answers[i].vector) for i in personal],
                n_categories, p, weights)))
        for i, a in enumerate(answers):
            ranked: list[Ranked] = []
            if a.vector is not None:
                ranked = lists[i]
                a.impression = lists[i].impression
            if len(ranked) < a.k:
                bound = popular_bound(a, p.oversample)
                if not pools[a.scene].covers(bound):
                    pools[a.scene] = await self._popular_pool(a.scene, bound)
                if newest is None or not newest.covers(bound):
                    newest = await self._ordered(await self.profiles.newest(bound), bound)
                taken = {r.item_id for r in ranked}
                unseen = [list(pool.unseen(a.profile.seen, (), bound)) for pool in (pools[a.scene], newest)]
                fill = cold_start(unseen[0], unseen[1], a.k - len(ranked), exclude=a.exclude | taken,
                                  only_categories=a.only_categories)
                ranked = list(ranked) + fill[: a.k - len(ranked)]
            produced.append((a.user_id, recommendations_json(
                a.user_id, a.trigger_id, a.trigger_type,
                [(r.item_id, r.score, r.reason, r.title, r.category) for r in ranked[: a.k]],
                MODEL_VERSION, self.encoder.version, a.event_time, self.clock(), a.scene, a.vector is None,
                a.duplicate)))
        return produced

    def _plans(self, answers: Sequence[_Answer], ids: dict[int, str]
               ) -> tuple[dict[int, "_Plan"], dict[int, list[str]], dict[int, int]]:
        """How each personalised list searches (see :meth:`answer`): its plan, the items clicked
        later in the batch that join it (``late``) and how many unseen items it wants."""
        p = self.params
        final: dict[int, tuple[Any, set[int]]] = {}  # id(seen before the batch) -> (it, + batch clicks)
        for a in answers:
            seen = a.profile.seen
            if a.vector is not None and isinstance(seen, _SeenView):
                final.setdefault(id(seen.base), (seen.base, set()))[1].update(seen.added)
        plans: dict[int, _Plan] = {}
        late: dict[int, list[str]] = {}
        limits: dict[int, int] = {}
        for i, a in enumerate(answers):
            if a.vector is None:
                continue
            seen = a.profile.seen
            base, added = (seen.base, seen.added) if isinstance(seen, _SeenView) else (seen, frozenset())
            batch_clicks = final[id(base)][1] if id(base) in final else set()
            lim, probe = search_limit(a.k, p.oversample, len(a.exclude))
            limits[i] = lim
            if len(base) + len(batch_clicks) >= EXCLUDE_IN_INDEX:
                late[i] = [ids[c] for c in batch_clicks if c not in added and c not in base and c in ids]
                plans[i] = _Plan(lim, a.only_categories, probe, _SeenView(base, frozenset(batch_clicks)), id(base), lim)
            else:
                need = _eights(lim + len(seen))
                plans[i] = _Plan(lim, a.only_categories, min(need, probe), seen, None, need)
        return plans, late, limits

    async def _search(self, answers: Sequence[_Answer], plans: dict[int, "_Plan"],
                      ahead: Optional[dict[tuple, list[Candidate]]] = None) -> dict[int, list[Candidate]]:
        """Each planned list's search hits, by answer index, best first: enough that its best
        ``limit`` unseen items are among them. First one plain batched search per group of lists
        (by the categories they are limited to), of the group's largest ``probe``: a list that
        keeps ``limit`` items after dropping its seen ones (or that got all the index has) has
        exactly what a search excluding them would give. The others search again: a short seen set
        over-fetched by its size (one search per few distinct limits), a long one excluded in the
        index (one search per user). Separate searches run concurrently."""
        out: dict[int, list[Candidate]] = {}
        groups: dict[tuple, list[int]] = {}
        for i, plan in plans.items():
            groups.setdefault(plan.only, []).append(i)

        async def probe(only: tuple[str, ...], idx: list[int]) -> None:
            limit = max(plans[i].probe for i in idx)
            hits = await self._searched_rows([answers[i].vector for i in idx], limit, only, (), ahead)
            for i, h in zip(idx, hits, strict=True):
                plan = plans[i]
                kept = [c for c in h if c.no not in plan.drop][:plan.limit]
                if len(kept) == plan.limit or len(h) < limit:  # full, or the index has nothing more to give
                    out[i] = kept
                if ahead is None:
                    self.metrics.probes.labels("hit" if i in out else "miss").inc()

        if ahead is None and self._ahead_pending is not None:  # the searches done ahead for this batch
            await asyncio.wait([self._ahead_pending])
            self._ahead_pending = None
        await asyncio.gather(*(probe(only, idx) for only, idx in groups.items()))
        again: dict[tuple, list[int]] = {}
        for i, plan in plans.items():
            if i not in out:  # long seen sets: one search per user; short ones: few distinct limits
                key = (plan.only, plan.owner) if plan.owner is not None else (plan.only, None, plan.need)
                again.setdefault(key, []).append(i)

        async def search(key: tuple, idx: list[int]) -> None:
            first = plans[idx[0]]
            excluded = first.drop.all if first.owner is not None else ()
            limit = max(plans[i].need for i in idx)
            hits = await self._searched_rows([answers[i].vector for i in idx], limit, key[0], excluded, ahead)
            out.update(zip(idx, hits, strict=True))

        await asyncio.gather(*(search(key, idx) for key, idx in again.items()))
        if ahead is None:
            self._searches_done()
        return out

    def _searches_done(self) -> None:
        """The running batch's own searches are done: the search ahead for the next batch may go."""
        if self._searched is not None and not self._searched.done():
            self._searched.set_result(None)

    async def _searched_rows(self, vectors: list[np.ndarray], limit: int, only: tuple[str, ...],
                             excluded: Collection[int], ahead: Optional[dict[tuple, list[Candidate]]]
                             ) -> list[list[Candidate]]:
        """The index's hits for each of ``vectors``: those searched ahead with exactly this vector,
        limit and filter (while the index was not written), the others in one search. ``ahead``:
        where a search ahead keeps what it found."""
        gen, done = self._ahead_hits
        looked = bool(done) and ahead is None  # searches were done ahead: count the lists they serve
        use = looked and gen == self._index_gen
        keys: list[tuple] = []
        if use or ahead is not None:
            ex = frozenset(excluded)
            keys = [(v.tobytes(), limit, only, ex) for v in vectors]
        got: list[Optional[list[Candidate]]] = [done.get(key) for key in keys] if use else [None] * len(vectors)
        todo = [j for j, h in enumerate(got) if h is None]
        if looked:
            self.metrics.lookahead.labels("hit").inc(len(vectors) - len(todo))
            self.metrics.lookahead.labels("miss").inc(len(todo))
        if todo:
            hits = await self._run(self.items.search, np.stack([vectors[j] for j in todo]), limit, only, excluded)
            for j, h in zip(todo, hits, strict=True):
                got[j] = h
                if ahead is not None:
                    ahead[keys[j]] = h
        return got  # type: ignore[return-value]

    def _look_ahead(self, after: dict[str, Profile]) -> None:
        """Begin the index searches of the events held behind this batch (``upcoming``), to run
        while this batch is ranked, published and written: their users' profiles as this batch
        leaves them (``after``, copied now) or as stored, their events applied as the next batch
        will apply them. What they find is used only by a search with exactly the same vector,
        limit and filter, and only while the item index is not written; anything else is searched
        as usual, so lists are the same with or without it."""
        if self.upcoming is None or "text" in self.params.off:
            return
        try:
            upcoming = self.upcoming()
            now = self.clock()
            by_user: dict[str, list] = {}
            queries: list[Query] = []  # in the order of the stream, as the next batch encodes them
            for m in upcoming:
                try:
                    e = parse_event(m.value, self.limits, now)
                except InvalidMessage:
                    continue
                by_user.setdefault(e.user_id, []).append((m, e))
                if isinstance(e, Query):
                    queries.append(e)
            clones = {u: _clone(after[u]) for u in by_user if u in after}
        except Exception:  # noqa: BLE001 - never the batch's failure: the next one searches as usual
            log.debug("reading the events held behind the batch failed; nothing is searched ahead", exc_info=True)
            return
        if not by_user:
            return
        self._searched = asyncio.get_running_loop().create_future()
        self._ahead_task = asyncio.ensure_future(self._search_ahead(by_user, queries, clones, self._searched))
        self._ahead_task.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _search_ahead(self, by_user: dict[str, list], queries: list[Query], clones: dict[str, Profile],
                            searched: asyncio.Future) -> None:
        """:meth:`_look_ahead`'s searches; their hits replace the last ones once done."""
        try:
            others = [u for u in by_user if u not in clones]
            stored = await self.profiles.load(others) if others else {}
            items = await self.fetch_items([e.item_id for evs in by_user.values() for _, e in evs if isinstance(e, Click)])
            qvecs: dict[str, np.ndarray] = {}  # those of the chunks encoded ahead; the others' users wait
            start = 0
            for chunk in self._chunks([q.text for q in queries]):
                job = self._prefetched.get(chunk)
                if job is not None:
                    qvecs.update(zip((q.event_id for q in queries[start:start + len(chunk)]), await job, strict=True))
                start += len(chunk)
            await searched  # this batch's own searches go first
            version = self.encoder.version
            answers: list[_Answer] = []
            for u, evs in by_user.items():
                prof = clones.get(u) or stored.get(u)
                if (prof is None or prof.reset or (prof.encoder and prof.encoder != version)
                        or any(isinstance(e, Click) and e.item_id not in items for _, e in evs)
                        or any(isinstance(e, Query) and e.event_id not in qvecs for _, e in evs)):
                    continue  # searched when its batch runs
                answers.extend(a for a in self._apply_user(prof, evs, items, qvecs, Output()) if a is not None)
            for a in answers:
                a.vector = query_vector(a.profile, a.scene, self.params)
            gen = self._index_gen
            if self._index_writing or not answers:
                return
            hits: dict[tuple, list[Candidate]] = {}
            await self._search(answers, self._plans(answers, {})[0], ahead=hits)
            if self._index_gen == gen:
                self._ahead_hits = (gen, hits)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - its batch searches as usual
            log.debug("searching ahead failed; the next batch searches as usual", exc_info=True)

    async def _behaviour_read(self, answers: Sequence[_Answer], kinds: Sequence[str], fresh: Optional[_Fresh] = None
                              ) -> tuple[dict[str, tuple[dict[int, list[str]], dict[str, tuple[list[str], np.ndarray]],
                                                         dict[int, list[tuple[int, dict[str, float]]]],
                                                         dict[int, dict[int, float]]]],
                                         dict[str, Candidate]]:
        """What :meth:`_behaviour_candidates` needs from the stores, for each of ``kinds``: per
        personalised list its sources (the user's last clicks, newest first), their partners, and
        with ``fresh`` what the batch's earlier clicks add to each source's partners and the
        factors of the stored rows (:meth:`_Fresh.adjust`); and the items of all of them, fetched
        once for every kind."""
        p = self.params
        sources: dict[str, dict[int, list[str]]] = {}
        raw: dict[str, dict[int, list[tuple[int, str, str, float]]]] = {}
        reads = []
        for kind in kinds:
            co = kind == "cooccur"
            n_sources = p.cooccur_sources if co else p.transition_sources
            sources[kind] = {i: list(dict.fromkeys(h["item_id"] for h in reversed(a.profile.history)
                                                   if h["type"] == "click"))[:n_sources]  # newest first
                             for i, a in enumerate(answers) if a.vector is not None}
            if fresh is not None:
                raw[kind] = {i: got for i, xs in sources[kind].items() if (got := fresh.added(kind, answers[i], xs))}
            all_sources = list(dict.fromkeys(x for xs in sources[kind].values() for x in xs))
            read = self.profiles.cooccurring_arrays if co else self.profiles.transitions_arrays
            reads.append(read(all_sources, p.cooccur_fanout if co else p.transition_fanout) if all_sources
                         else _nothing())
        added: dict[str, dict[int, list[tuple[int, dict[str, float]]]]] = {kind: {} for kind in kinds}
        grown: dict[str, dict[int, dict[int, float]]] = {kind: {} for kind in kinds}
        if fresh is None:
            partners = dict(zip(kinds, await together(*reads), strict=True))
        else:  # the stored clicks of the batch's clicked items and of the items added partners name
            named = list(dict.fromkeys([*fresh.items, *(z for got in raw.values() for adds in got.values()
                                                         for _, x, y, _ in adds for z in (x, y))]))
            *got, clicks = await together(*reads, self.profiles.item_clicks(named, max(a.event_time for a in answers)))
            partners = dict(zip(kinds, got, strict=True))
            fresh.know(clicks)
            for kind in kinds:
                for i, xs in sources[kind].items():
                    factors, rows = fresh.adjust(kind, answers[i], xs, raw[kind].get(i, ()))
                    if factors:
                        grown[kind][i] = factors
                    if rows:
                        added[kind][i] = rows
        known = await self.fetch_items([*(x for kind in kinds for xs in sources[kind].values() for x in xs),
                                        *(y for kind in kinds for ys, _ in partners[kind].values() for y in ys),
                                        *(y for kind in kinds for rows in added[kind].values() for _, row in rows
                                          for y in row)])
        return {kind: (sources[kind], partners[kind], added[kind], grown[kind]) for kind in kinds}, known

    def _behaviour_candidates(self, answers: Sequence[_Answer], results: dict[int, list[Candidate]],
                              signals: dict[int, Signals], kind: str, sources: dict[int, list[str]],
                              partners: dict[str, tuple[list[str], np.ndarray]],
                              added: dict[int, list[tuple[int, dict[str, float]]]],
                              grown: dict[int, dict[int, float]], known: dict[str, Candidate],
                              fresh: Optional[_Fresh] = None) -> None:
        """For each personalised list: items co-clicked with the user's last ``cooccur_sources``
        clicks (``kind`` "cooccur"), or clicked right after the last ``transition_sources`` ones,
        the nearest weighing most ("transitions"), from :meth:`_behaviour_read`. Each item's
        summed score and the title of the click that gives it most go into ``signals``; the best
        ``k * behaviour_oversample`` join the candidates (``results``; ranking takes their cosines
        from their vectors)."""
        p = self.params
        co = kind == "cooccur"
        # per source: its partners' catalog numbers and scores, as arrays
        table: dict[str, _Row] = {}
        no_of = {y: c.no for y, c in known.items()}
        for x, (ids_, vals_) in partners.items():
            if not ids_:
                continue
            nos_ = np.fromiter(map(no_of.get, ids_, itertools.repeat(-1)), dtype=np.int64, count=len(ids_))
            vals = np.asarray(vals_, dtype=np.float64)
            if (nos_ < 0).any():  # partners the item cache does not know
                keep = nos_ >= 0
                nos_, vals = nos_[keep], vals[keep]
            if len(nos_):
                table[x] = _Row(nos_, vals)
        scale: Callable[[int], float] = (lambda pos: 1.0) if co else (lambda pos: 1.0 / (pos + 1))
        ids_by_no: Optional[dict[int, str]] = None
        lists: list[tuple[int, list[str], list[tuple[int, _Row, float]]]] = []
        for i, xs in sources.items():
            rescaled = grown.get(i, {})
            parts = [(pos, table[x], rescaled.get(pos, 1.0)) for pos, x in enumerate(xs) if x in table]
            for pos, row in added.get(i, ()):  # the batch's earlier clicks, beside the stored rows
                ys = [y for y in row if y in no_of]
                if ys:
                    parts.append((pos, _Row(np.array([no_of[y] for y in ys], dtype=np.int64),
                                            np.array([row[y] for y in ys], dtype=np.float64)), 1.0))
            if parts:
                lists.append((i, xs, parts))
        if not lists:
            return
        # every list's partner sums at once, then each list's share of them
        rows = [(g, pos, row, f) for g, (_, _, parts) in enumerate(lists) for pos, row, f in parts]
        group_of, all_nos, all_sums = grouped_sums(
            np.repeat(np.array([g for g, _, _, _ in rows], dtype=np.int64), [len(row.nos) for _, _, row, _ in rows]),
            np.concatenate([row.nos for _, _, row, _ in rows]),
            np.concatenate([row.vals * (scale(pos) * f) if not co or f != 1.0 else row.vals
                            for _, pos, row, f in rows]))
        bounds = np.searchsorted(group_of, np.arange(len(lists) + 1)).tolist()
        for g, (i, xs, parts) in enumerate(lists):
            a = answers[i]
            uniq, sums = all_nos[bounds[g]:bounds[g + 1]], all_sums[bounds[g]:bounds[g + 1]]
            if co and fresh is not None:  # partners clicked earlier in the batch: over their clicks by then
                sums = fresh.regrown(uniq, sums, a.position)
            nos_list = uniq.tolist()
            summed = _Summed(uniq, nos_list, sums, parts, scale, xs, known)
            if co:
                signals[i].cooccur, signals[i].cooccur_from = _Sums(summed), _From(summed)
            else:
                signals[i].transitions, signals[i].transitions_from = _Sums(summed), _From(summed)
            # the best ``n`` unseen, not excluded, by (-sum, item id): walk down the sums and stop
            # past the n-th one's sum (equal sums all taken, then ordered by id)
            if ids_by_no is None:
                ids_by_no = {c.no: y for y, c in known.items()}
            seen = a.profile.seen.all if isinstance(a.profile.seen, _SeenView) else a.profile.seen
            exclude = a.exclude
            n = a.k * p.behaviour_oversample
            taken: list[tuple[float, str]] = []
            values = sums.tolist()
            for j in np.argsort(-sums).tolist():
                v = values[j]
                if len(taken) >= n and v < taken[n - 1][0]:
                    break
                no = nos_list[j]
                if no in seen:
                    continue
                y = ids_by_no[no]
                if exclude and y in exclude:
                    continue
                taken.append((v, y))
            taken.sort(key=lambda vy: (-vy[0], vy[1]))
            results[i] = results.get(i, []) + [known[y] for _, y in taken[:n]
                                               if known[y].vector is not None and known[y].available]

    async def _popular_pool(self, scene: Optional[str], n: int) -> _Popular:
        """The ``n`` most popular items (with vectors, similarity = popularity)."""
        return await self._ordered(await self.profiles.popular(scene, n, enough=POPULAR_READ), n)

    async def _popular_pools(self, scenes: Sequence[Optional[str]], n: int) -> dict[Optional[str], _Popular]:
        """:meth:`_popular_pool` of each of ``scenes``, read together."""
        rows = await self.profiles.popular_many(scenes, n, enough=POPULAR_READ)
        return {scene: await self._ordered(rows[scene], n) for scene in scenes}

    async def _ordered(self, rows: list[tuple[str, float]], n: int) -> _Popular:
        """``rows``, the first of an order asked ``n`` deep, as candidates with their ranks."""
        rank = {i: r for r, (i, _) in enumerate(rows)}
        items = await self._pool(rows)
        return _Popular(items, [rank[c.item_id] for c in items], len(rows), len(rows) < n)

    async def _pool(self, rows: list[tuple[str, float]]) -> list[Candidate]:
        """Candidates with vectors and attributes for (item id, score) rows; unknown and unavailable
        items dropped."""
        meta = await self.fetch_items([i for i, _ in rows])
        return [Candidate(i, s, *_attrs(meta[i])) for i, s in rows if i in meta and meta[i].available]

    def dead_letter(self, m: RawMessage, error: str, reason: str) -> tuple[Optional[bytes], bytes]:
        """A dead-letter message for ``m``, keyed like the original."""
        rec = DeadLetter(source_topic=m.topic, partition=m.partition, offset=m.offset,
                         value_b64=base64.b64encode(m.value or b"").decode(), error=error, reason=reason,
                         produced_time=self.clock(),
                         key_b64=base64.b64encode(m.key).decode() if m.key is not None else None)
        return m.key, json.dumps(to_wire(rec)).encode()
