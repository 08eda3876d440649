"""What the agents do with a micro-batch, apart from Kafka: decode, update profiles, rank, and
build the messages to publish. Agents feed it raw messages and publish what it returns, then ack.

Everything here is idempotent: running a batch again (after a crash, or a retry) applies no
event twice; it only publishes its recommendations again (marked ``duplicate``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from models.params import ModelParams
from models.profile import Profile, apply_click, apply_query, click_strength, query_vector
from models.ranking import Candidate, Ranked, cold_start, rank
from schemas import (Click, DeadLetter, ForgetUser, InvalidMessage, ItemDelete, ItemUpsert, Limits, Query,
                     RecommendationRequest, RecommendedItem, Recommendations, parse_catalog, parse_event,
                     parse_request)
from schemas.validate import to_wire
from streams.stores.items import ItemIndex, ItemRow
from streams.stores.profiles import CoClick, ConflictError, PopularityUpdate, ProfileStore

MODEL_VERSION = "streamrec-1"
#: Seen sets at least this large are excluded in the item index instead of over-fetched.
EXCLUDE_IN_INDEX = 64


@dataclass
class RawMessage:
    """A message as consumed: where it came from and its bytes."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]


@dataclass
class Output:
    """Messages to publish, keyed: recommendations and dead letters."""

    recommendations: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[Optional[bytes], bytes]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n


class ItemCache:
    """Recently used items (with vectors), bounded in size and age."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl, self.clock = size, ttl_s, clock
        self._d: OrderedDict[str, tuple[float, Candidate]] = OrderedDict()

    def get(self, item_id: str) -> Optional[Candidate]:
        hit = self._d.get(item_id)
        if hit is None or self.clock() - hit[0] > self.ttl:
            return None
        self._d.move_to_end(item_id)
        return hit[1]

    def put(self, c: Candidate) -> None:
        if self.size <= 0:
            return
        self._d[c.item_id] = (self.clock(), c)
        self._d.move_to_end(c.item_id)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def drop(self, item_id: str) -> None:
        self._d.pop(item_id, None)


def _attrs(c: Candidate) -> tuple:
    return c.vector, c.title, c.category, c.scenes


class _SeenView:
    """The seen set as it was right after one event of a batch."""

    __slots__ = ("base", "added")

    def __init__(self, base: set[str], added: frozenset[str]) -> None:
        self.base, self.added = base, added

    def __contains__(self, item: object) -> bool:
        return item in self.added or item in self.base

    def __len__(self) -> int:
        return len(self.base) + len(self.added)


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
    """

    def __init__(self, profiles: ProfileStore, items: ItemIndex, encoder: Any, params: ModelParams,
                 limits: Limits, k: int = 10, item_cache: Optional[ItemCache] = None,
                 executor: Optional[Executor] = None, clock: Callable[[], float] = time.time) -> None:
        self.profiles, self.items, self.encoder = profiles, items, encoder
        self.params, self.limits, self.k = params, limits, k
        self.cache = item_cache or ItemCache(50_000, 60.0)
        self.executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="streamrec-io")
        self._encode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrec-encode")
        self.clock = clock

    async def _run(self, fn: Callable, *args: Any, encoder: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encode_executor if encoder else self.executor, fn, *args)

    # -- catalog -------------------------------------------------------------------------------

    async def process_catalog(self, batch: Sequence[RawMessage]) -> Output:
        """Encode and index upserted items, remove deleted ones."""
        out = Output()
        now = self.clock()
        last: dict[str, ItemUpsert | ItemDelete] = {}
        for m in batch:
            try:
                rec = parse_catalog(m.value, self.limits, now)
            except InvalidMessage as exc:
                out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
                continue
            last.pop(rec.item_id, None)
            last[rec.item_id] = rec  # the last operation on an item wins
        upserts = [r for r in last.values() if isinstance(r, ItemUpsert)]
        deletes = [r for r in last.values() if isinstance(r, ItemDelete)]
        if upserts:
            vectors = await self._run(self.encoder.encode, [r.text() for r in upserts], encoder=True)
            rows = [ItemRow(r.item_id, v, r.title, r.category, tuple(r.scenes), r.available, r.timestamp)
                    for r, v in zip(upserts, vectors, strict=True)]
            await self._run(self.items.upsert, rows)
            await self.profiles.add_items([(r.item_id, r.timestamp, r.category) for r in upserts if r.available])
            unavailable = [r.item_id for r in upserts if not r.available]
            if unavailable:
                await self.profiles.remove_items(unavailable, ())
            out.count("items_upserted", len(upserts))
        if deletes:
            ids = [r.item_id for r in deletes]
            await self._run(self.items.delete, ids)
            await self.profiles.remove_items(ids, ())
            out.count("items_deleted", len(deletes))
        for item_id in last:
            self.cache.drop(item_id)
        out.count("dead_letters", len(out.dead_letters))
        return out

    # -- events --------------------------------------------------------------------------------

    async def process_events(self, batch: Sequence[RawMessage]) -> Output:
        """Apply clicks and queries to profiles and produce one list per valid event."""
        out = Output()
        now = self.clock()
        events: list[tuple[RawMessage, Click | Query | ForgetUser]] = []
        for m in batch:
            try:
                events.append((m, parse_event(m.value, self.limits, now)))
            except InvalidMessage as exc:
                out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
        out.count("events_in", len(batch))

        items = await self.fetch_items([e.item_id for _, e in events if isinstance(e, Click)])
        valid: list[Click | Query | ForgetUser] = []
        for m, e in events:
            if isinstance(e, Click) and e.item_id not in items:
                out.dead_letters.append(self.dead_letter(m, "unknown_item", f"item {e.item_id!r} is not in the catalog"))
            else:
                valid.append(e)
        queries = [e for e in valid if isinstance(e, Query)]
        qvecs = await self._run(self.encoder.encode, [q.text for q in queries], encoder=True) if queries else []
        query_vectors = {q.event_id: v for q, v in zip(queries, qvecs, strict=True)}

        by_user: dict[str, list] = {}
        for e in valid:
            by_user.setdefault(e.user_id, []).append(e)
        answers: dict[str, list[_Answer]] = {}
        pops: list[PopularityUpdate] = []
        coclicks: list[CoClick] = []
        for _attempt in range(8):
            pending = [u for u in by_user if u not in answers]
            if not pending:
                break
            profiles = await self.profiles.load(pending)
            done = await self.profiles.applied([(u, e.event_id) for u in pending for e in by_user[u]])
            flags = iter(done)
            for u in pending:
                user_events = by_user[u]
                applied_before = {e.event_id for e in user_events if next(flags)}
                try:
                    answers[u], user_pops, user_co, n_applied, n_dup = await self._apply_user(
                        profiles[u], user_events, applied_before, items, query_vectors)
                except ConflictError:
                    continue  # another writer: read again
                pops += user_pops
                coclicks += user_co
                out.count("events_applied", n_applied)
                out.count("duplicates", n_dup)
        if len(answers) < len(by_user):  # retried as a whole batch by the agent
            raise ConflictError(f"profiles of {len(by_user) - len(answers)} users kept changing during the batch")
        forgotten = sum(isinstance(e, ForgetUser) for e in valid)
        if forgotten:
            out.count("users_forgotten", forgotten)
        # Lists see popularity and co-clicks as they were before this batch: never a click that
        # comes after their event.
        flat = [a for u in by_user for a in answers[u] if a is not None]
        for rec in await self.answer(flat):
            out.recommendations.append((rec.user_id.encode(), json.dumps(to_wire(rec)).encode()))
        await self.profiles.bump_popularity(pops)
        await self.profiles.bump_cooccurrence(coclicks)
        out.count("recommendations_out", len(out.recommendations))
        out.count("dead_letters", len(out.dead_letters))
        return out

    async def _apply_user(self, profile: Profile, user_events: list, applied_before: set[str],
                          items: dict[str, Candidate], query_vectors: dict[str, np.ndarray]):
        """Apply one user's events in order; commit; return the lists to produce."""
        p = self.params
        answers: list[Optional[_Answer]] = []
        pops: list[PopularityUpdate] = []
        coclicks: list[CoClick] = []
        base_seen = set(profile.seen)
        expected = profile.version
        added: list[str] = []
        applied_ids: list[str] = []
        seen_in_batch: set[str] = set()
        n_dup = n_committed = 0
        for e in user_events:
            duplicate = e.event_id in applied_before or e.event_id in seen_in_batch
            seen_in_batch.add(e.event_id)
            if isinstance(e, ForgetUser):
                if applied_ids:
                    await self.profiles.commit(profile, expected, added, applied_ids)
                    n_committed += len(applied_ids)
                await self.profiles.forget(e.user_id)
                profile, expected, base_seen, added, applied_ids = Profile(user_id=e.user_id), 0, set(), [], []
                answers.append(None)  # a forgotten user gets no list
                continue
            if duplicate:
                n_dup += 1
            elif isinstance(e, Click):
                it = items[e.item_id]
                earlier = [h["item_id"] for h in profile.history if h["type"] == "click"][-p.cooccur_window:]
                if it.available:  # an unavailable item gains no popularity and no co-clicks
                    coclicks.append(CoClick(it.item_id, earlier))
                apply_click(profile, it.item_id, it.vector, it.title, it.category, e.scene,
                            click_strength(e.weight, e.dwell_s, p), e.event_id, e.timestamp, p)
                if it.item_id not in base_seen:
                    added.append(it.item_id)
                if it.available:
                    pops.append(PopularityUpdate(it.item_id, e.scene, e.timestamp, e.weight))
                applied_ids.append(e.event_id)
            else:
                apply_query(profile, e.text, query_vectors[e.event_id], e.scene, e.event_id, e.timestamp, p)
                applied_ids.append(e.event_id)
            snap = copy.copy(profile)  # vectors are replaced, never changed in place; containers are copied
            snap.scenes = dict(profile.scenes)
            snap.interest = dict(profile.interest)
            snap.explainers = list(profile.explainers)
            snap.history = list(profile.history)
            snap.seen = _SeenView(base_seen, frozenset(added))  # type: ignore[assignment]
            answers.append(_Answer(e.user_id, e.event_id, "click" if isinstance(e, Click) else "query", e.scene,
                                   e.timestamp, self.k, snap, duplicate=duplicate))
        if applied_ids:
            await self.profiles.commit(profile, expected, added, applied_ids)
        return answers, pops, coclicks, n_committed + len(applied_ids), n_dup

    # -- requests ------------------------------------------------------------------------------

    async def process_requests(self, batch: Sequence[RawMessage]) -> Output:
        """Answer recommendation requests from current profiles, changing nothing."""
        out = Output()
        now = self.clock()
        reqs: list[RecommendationRequest] = []
        for m in batch:
            try:
                reqs.append(parse_request(m.value, self.limits, now))
            except InvalidMessage as exc:
                out.dead_letters.append(self.dead_letter(m, exc.error, exc.reason))
        profiles = await self.profiles.load([r.user_id for r in reqs]) if reqs else {}
        answers = [_Answer(r.user_id, r.request_id, "request", r.scene, r.timestamp, r.k or self.k,
                           profiles[r.user_id], exclude=frozenset(r.exclude), only_categories=tuple(r.categories))
                   for r in reqs]
        for rec in await self.answer(answers):
            out.recommendations.append((rec.user_id.encode(), json.dumps(to_wire(rec)).encode()))
        out.count("requests_answered", len(out.recommendations))
        out.count("dead_letters", len(out.dead_letters))
        return out

    # -- shared --------------------------------------------------------------------------------

    async def fetch_items(self, item_ids: Sequence[str]) -> dict[str, Candidate]:
        """Items with vectors, from the cache or the index."""
        found: dict[str, Candidate] = {}
        missing = []
        for i in dict.fromkeys(item_ids):
            c = self.cache.get(i)
            if c is None:
                missing.append(i)
            else:
                found[i] = c
        if missing:
            for i, c in (await self._run(self.items.get, missing)).items():
                self.cache.put(c)
                found[i] = c
        return found

    async def answer(self, answers: Sequence[_Answer]) -> list[Recommendations]:
        """Rank a list for each answer: one batched search for all personalised ones, the
        cold-start list (popularity, then newest) for the rest and to fill short lists."""
        if not answers:
            return []
        p = self.params
        n_categories = await self.profiles.category_count()
        for a in answers:
            a.vector = query_vector(a.profile, a.scene, p)
        results: dict[int, list[Candidate]] = {}
        # One search per bucket. Small seen sets are over-fetched (the limit grows by their size).
        # A large one is excluded in the index, once for all of its user's lists in the batch: the
        # seen set after the whole batch is excluded, and the items the user clicks later in the
        # batch (unseen when an earlier list is made) join that list's candidates, scored here.
        final: dict[int, tuple[Any, set[str]]] = {}  # id(seen before the batch) -> (it, + batch clicks)
        for a in answers:
            seen = a.profile.seen
            if a.vector is not None and isinstance(seen, _SeenView):
                final.setdefault(id(seen.base), (seen.base, set()))[1].update(seen.added)
        buckets: dict[tuple, tuple[int, list[int], Any]] = {}
        late: dict[int, list[str]] = {}
        limits: dict[int, int] = {}
        for i, a in enumerate(answers):
            if a.vector is None:
                continue
            seen = a.profile.seen
            base, added = (seen.base, seen.added) if isinstance(seen, _SeenView) else (seen, frozenset())
            batch_clicks = final[id(base)][1] if id(base) in final else set()
            # Every list is ranked from the same candidates however it is batched: the best
            # ``limits[i]`` items by cosine among those unseen when the list is made.
            limits[i] = need = -(-(a.k * p.oversample + len(a.exclude)) // 8) * 8
            if len(base) + len(batch_clicks) >= EXCLUDE_IN_INDEX:
                key: tuple = (a.only_categories, id(base))
                exclude: Any = (base, batch_clicks)
                late[i] = [c for c in batch_clicks if c not in added and c not in base]
            else:
                need += len(seen)
                key = (a.only_categories, None, -(-need // 8))  # few distinct limits: few searches
                exclude = None
            limit, idx, _ = buckets.get(key, (0, [], exclude))
            idx.append(i)
            buckets[key] = (max(limit, -(-need // 8) * 8), idx, exclude)
        for (only, *_), (limit, idx, exclude) in buckets.items():
            excluded = set().union(*exclude) if exclude else ()
            hits = await self._run(self.items.search, np.stack([answers[i].vector for i in idx]), limit, only,
                                   excluded)
            for i, h in zip(idx, hits, strict=True):
                seen = answers[i].profile.seen
                results[i] = [c for c in h if c.item_id not in seen][: limits[i]]
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
        # Items often clicked with the user's recent clicks join the candidates, with their score.
        cooccur: dict[int, dict[str, float]] = {}
        cooccur_with: dict[int, dict[str, str]] = {}
        if p.w_cooccur > 0:
            await self._cooccur_candidates(answers, results, cooccur, cooccur_with)
        # Popular items join every personalised list's candidates (scored by cosine like the rest,
        # plus the popularity boost) and fill the cold-start lists.
        pool_size = max(a.k for a in answers) * p.oversample + max(len(a.profile.seen) + len(a.exclude) for a in answers)
        pools: dict[Optional[str], tuple[list[Candidate], dict[str, float]]] = {}
        newest: Optional[list[Candidate]] = None  # read only when a list needs filling
        produced: list[Recommendations] = []
        for i, a in enumerate(answers):
            if a.scene not in pools:
                pools[a.scene] = await self._popular_pool(a.scene, pool_size)
            popular, popularity = pools[a.scene]
            ranked: list[Ranked] = []
            if a.vector is not None:
                candidates = results.get(i, [])
                if p.w_popularity > 0:
                    extra = [c for c in popular if c.item_id not in a.profile.seen and c.item_id not in a.exclude]
                    candidates = candidates + [Candidate(c.item_id, float(np.dot(a.vector, c.vector)), *_attrs(c))
                                               for c in extra[: a.k * p.oversample]]
                ranked = rank(a.profile, candidates, a.k, a.scene, n_categories, p, exclude=a.exclude,
                              only_categories=a.only_categories, popularity=popularity,
                              cooccur=cooccur.get(i), cooccur_with=cooccur_with.get(i))
            if len(ranked) < a.k:
                if newest is None:
                    newest = await self._pool(await self.profiles.newest(pool_size))
                taken = {r.item_id for r in ranked}
                fill = cold_start(popular, newest, a.k - len(ranked) + len(a.profile.seen), exclude=a.exclude | taken,
                                  only_categories=a.only_categories)
                ranked += [r for r in fill if r.item_id not in a.profile.seen][: a.k - len(ranked)]
            produced.append(Recommendations(
                user_id=a.user_id, trigger_event_id=a.trigger_id, trigger_type=a.trigger_type,
                items=[RecommendedItem(item_id=r.item_id, score=r.score, reason=r.reason, title=r.title,
                                       category=r.category) for r in ranked[: a.k]],
                model_version=MODEL_VERSION, encoder=self.encoder.version, event_time=a.event_time,
                produced_time=self.clock(), scene=a.scene, cold_start=a.vector is None, duplicate=a.duplicate))
        return produced

    async def _cooccur_candidates(self, answers: Sequence[_Answer], results: dict[int, list[Candidate]],
                                  cooccur: dict[int, dict[str, float]], cooccur_with: dict[int, dict[str, str]]) -> None:
        """For each personalised list: the items clicked by the same users as the user's last
        clicks, scored by summed normalised co-clicks relative to the best (into ``cooccur``), the
        title of the click each is most often clicked with (``cooccur_with``), and the best of
        them added to its candidates (``results``) with their cosine similarity."""
        p = self.params
        sources = {i: list(dict.fromkeys(h["item_id"] for h in a.profile.history if h["type"] == "click"))[-p.cooccur_sources:]
                   for i, a in enumerate(answers) if a.vector is not None}
        all_sources = list(dict.fromkeys(x for xs in sources.values() for x in xs))
        if not all_sources:
            return
        partners = await self.profiles.cooccurring(all_sources, p.cooccur_fanout)
        best_of: dict[int, list[str]] = {}
        for i, xs in sources.items():
            a = answers[i]
            total: dict[str, float] = {}
            strongest: dict[str, tuple[float, str]] = {}
            for x in xs:
                for y, score in partners.get(x, ()):
                    if y in a.profile.seen or y in a.exclude:
                        continue
                    total[y] = total.get(y, 0.0) + score
                    if score > strongest.get(y, (0.0, ""))[0]:
                        strongest[y] = (score, x)
            if total:
                top = max(total.values())
                cooccur[i] = {y: v / top for y, v in total.items()}
                cooccur_with[i] = {y: x for y, (_, x) in strongest.items()}
                best_of[i] = sorted(total, key=lambda y: (-total[y], y))[: a.k * p.oversample]
        known = await self.fetch_items([*all_sources, *(y for ys in best_of.values() for y in ys)])
        for i, ys in best_of.items():
            a = answers[i]
            cooccur_with[i] = {y: known[x].title or x for y, x in cooccur_with[i].items() if x in known}
            results[i] = results.get(i, []) + [Candidate(y, float(np.dot(a.vector, known[y].vector)), *_attrs(known[y]))
                                               for y in ys if y in known and known[y].vector is not None
                                               and known[y].available]

    async def _popular_pool(self, scene: Optional[str], n: int) -> tuple[list[Candidate], dict[str, float]]:
        """The ``n`` most popular items (with vectors, similarity = popularity) and each one's
        popularity relative to the first."""
        popular = await self.profiles.popular(scene, n)
        top = popular[0][1] if popular and popular[0][1] > 0 else 1.0
        return await self._pool(popular), {i: s / top for i, s in popular}

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
