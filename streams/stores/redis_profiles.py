"""The Redis profile store: one Redis server or a Redis Cluster.

Keys (``P`` is the key prefix; ``{...}`` is a hash tag, so the keys of one script share a slot):

- ``P:{u:ID}``: the user's record (``streams.stores.codec``); a forgotten user's tombstone expires.
- Shard ``k`` of per-item state (``k = crc32(item) % shards``; stats by source):
  ``P:{s:k}:m`` hash of watermarks ``w:<source>``, the last batch begun ``b:<source>`` and the
  last whose effects began to apply ``a:<source>``, decay
  references and the scenes it tracks; ``P:{s:k}:pop`` and ``P:{s:k}:pop:<scene>`` decayed
  popularity; ``P:{s:k}:n`` decayed clicks per item; ``P:{s:k}:co:<item>`` and ``P:{s:k}:tr:<item>``
  decayed co-clicks and steps of an item; ``P:{s:k}:stats`` counters.
- ``P:{model}:w``: the ranker's learned sums and a watermark per source.
- Catalog: ``P:{cat}:no`` catalog numbers, ``P:{cat}:m`` next number and indexed positions,
  ``P:{cat}:new`` newest items, ``P:{cat}:cats`` categories.

Every script declares every key it touches. No key is written by every worker: a worker writes
its users' records and the shards its clicks fall in.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import struct
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from models.learning import FEATURES, MODEL_ID
from models.profile import Profile
from streams.stores import codec
from streams.stores.profiles import (DELIVERY_STATS, STAT_FIELDS, Effects, ProfileStore, StoreOptions, Write,
                                     normalised_cooccurrence, shard_of,
                                     transition_weights)

log = logging.getLogger("streamrec.store")

# KEYS[1]: the user's record. ARGV: expected version (4 bytes, '' for none), record, ttl ms, replace.
_COMMIT = """
if ARGV[4] ~= '1' then
  local t = redis.call('TYPE', KEYS[1])['ok']
  if t == 'none' then
    if ARGV[1] ~= '' then return 0 end
  elseif t ~= 'string' or redis.call('GETRANGE', KEYS[1], 3, 6) ~= ARGV[1] then
    return 0
  end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""

# One shard's effects. KEYS: meta, pop, n, stats, then the scene zsets, then the co-click zsets.
# ARGV: pop halflife, co halflife, co keep, pop keep, #scenes, #co keys, then the ops as one JSON
# array (decoded in the server: one argument instead of hundreds per click), in groups of 7:
#   'p' source offset item scene# t w   popularity (+ scene's) and the item's click count
#   'c' source offset partner co# t -   a co-click of the co# key's item with partner
#   's' source offset field - n -       a stat ('r': a stat counted per delivery)
# An op is applied only if its offset is past the shard's watermark for its source.
# Returns 'rescale' or 'rescale_co' (nothing applied) when a decay reference must move first.
_APPLY = """
local m = KEYS[1]
local hp, hc = tonumber(ARGV[1]), tonumber(ARGV[2])
local keep_co, keep_pop = tonumber(ARGV[3]), tonumber(ARGV[4])
local ns, nc = tonumber(ARGV[5]), tonumber(ARGV[6])
local A = cjson.decode(ARGV[7])
local ref = tonumber(redis.call('HGET', m, 'ref') or '')
local cref = tonumber(redis.call('HGET', m, 'cref') or '')
for i = 1, #A, 7 do
  local kind, t = A[i], tonumber(A[i + 5])
  if kind == 'p' or kind == 'c' or kind == 't' then
    if not ref then ref = t; redis.call('HSET', m, 'ref', t) end
    if not cref then cref = t; redis.call('HSET', m, 'cref', t) end
    if (t - ref) / hp > 64 then return 'rescale' end
    if (t - cref) / hc > 900 then return 'rescale_co' end
  end
end
local wm, new = {}, {}
local function fresh(src, off)
  if wm[src] == nil then wm[src] = tonumber(redis.call('HGET', m, 'w:' .. src) or '-1') end
  if off <= wm[src] then return false end
  if (new[src] or -1) < off then new[src] = off end
  return true
end
local touched_pop, touched_co = {}, {}
local clicks, pairs_, steps = 0, 0, 0
for i = 1, #A, 7 do
  local kind, src, off = A[i], A[i + 1], tonumber(A[i + 2])
  if kind == 'r' then
    redis.call('HINCRBY', KEYS[4], A[i + 3], A[i + 5])
  elseif fresh(src, off) then
    if kind == 'p' then
      local item, si, t, w = A[i + 3], tonumber(A[i + 4]), tonumber(A[i + 5]), tonumber(A[i + 6])
      local s = w * math.pow(2, (t - ref) / hp)
      redis.call('ZINCRBY', KEYS[2], s, item)
      touched_pop[KEYS[2]] = true
      if si > 0 then
        redis.call('ZINCRBY', KEYS[4 + si], s, item)
        touched_pop[KEYS[4 + si]] = true
      end
      redis.call('HINCRBYFLOAT', KEYS[3], item, math.pow(2, (t - cref) / hc))
      clicks = clicks + 1
    elseif kind == 'c' or kind == 't' then
      local key = KEYS[4 + ns + tonumber(A[i + 4])]
      redis.call('ZINCRBY', key, tonumber(A[i + 6]) * math.pow(2, (tonumber(A[i + 5]) - cref) / hc), A[i + 3])
      touched_co[key] = true
      if kind == 'c' then pairs_ = pairs_ + 1 else steps = steps + 1 end
    else
      redis.call('HINCRBY', KEYS[4], A[i + 3], A[i + 5])
    end
  end
end
for key in pairs(touched_pop) do redis.call('ZREMRANGEBYRANK', key, 0, -(keep_pop + 1)) end
for key in pairs(touched_co) do redis.call('ZREMRANGEBYRANK', key, 0, -(keep_co + 1)) end
for src, off in pairs(new) do redis.call('HSET', m, 'w:' .. src, off) end
if clicks > 0 then redis.call('HINCRBY', m, 'clicks', clicks) end
if pairs_ > 0 then redis.call('HINCRBY', m, 'pairs', pairs_) end
if steps > 0 then redis.call('HINCRBY', m, 'steps', steps) end
return 'ok'
"""

# The ranker's steps, each at most once. KEYS: the model hash. ARGV: the model id, the feature
# names' count F, the feature names, then per step: source, offset, F deltas. Returns the steps applied.
_LEARN = """
local h = KEYS[1]
local id, f = ARGV[1], tonumber(ARGV[2])
if redis.call('HGET', h, 'model') ~= id then
  redis.call('DEL', h)
  redis.call('HSET', h, 'model', id)
end
local names = {}
for j = 1, f do names[j] = ARGV[2 + j] end
local wm, applied = {}, 0
for i = 3 + f, #ARGV, 2 + f do
  local src, off = ARGV[i], tonumber(ARGV[i + 1])
  if wm[src] == nil then wm[src] = tonumber(redis.call('HGET', h, 'w:' .. src) or '-1') end
  if off > wm[src] then
    for j = 1, f do redis.call('HINCRBYFLOAT', h, names[j], ARGV[i + 1 + j]) end
    wm[src] = off
    applied = applied + 1
    redis.call('HSET', h, 'w:' .. src, off)
  end
end
if applied > 0 then redis.call('HINCRBY', h, 'steps', applied) end
return applied
"""

# Move a decay reference forward. KEYS: meta, then every zset or hash scored against it.
# ARGV: the reference field ('ref' or 'cref'), the new reference, the factor.
_RESCALE = """
local f = tonumber(ARGV[3])
for i = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t == 'zset' then
    local rows = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
    for j = 1, #rows, 2 do redis.call('ZADD', KEYS[i], tonumber(rows[j + 1]) * f, rows[j]) end
  elseif t == 'hash' then
    local rows = redis.call('HGETALL', KEYS[i])
    for j = 1, #rows, 2 do redis.call('HSET', KEYS[i], rows[j], tonumber(rows[j + 1]) * f) end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: numbers hash, catalog meta. ARGV: item ids. Returns their numbers.
_NUMBER = """
local out = {}
for i = 1, #ARGV do
  local n = redis.call('HGET', KEYS[1], ARGV[i])
  if not n then
    n = redis.call('HINCRBY', KEYS[2], 'next', 1) - 1
    redis.call('HSET', KEYS[1], ARGV[i], n)
  end
  out[i] = tonumber(n)
end
return out
"""

# Partner rows of one shard's items, best first: each as two strings, its members joined by the
# byte 255 (never in UTF-8 text) and their scores as little-endian doubles; a row's
# hundreds of entries cost the client two strings, not two parsed reply entries each.
# KEYS: the rows. ARGV: n; above 0, a row's entries down to its n-th score (less 1e-12 of it) only.
_ROWS = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local nth = n > 0 and redis.call('ZREVRANGE', KEYS[i], n - 1, n - 1, 'WITHSCORES') or {}
  local row
  if #nth == 0 then
    row = redis.call('ZREVRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  else
    local s = tonumber(nth[2])
    row = redis.call('ZREVRANGEBYSCORE', KEYS[i], '+inf', s - math.abs(s) * 1e-12, 'WITHSCORES')
  end
  local ids, scores, m = {}, {}, 0
  for j = 1, #row, 2 do
    m = m + 1
    ids[m] = row[j]
    scores[m] = row[j + 1]
  end
  local packed = {}
  for a = 1, m, 4000 do  -- one pack call for many scores (struct reads their text as numbers)
    local b = math.min(a + 3999, m)
    packed[#packed + 1] = struct.pack('<' .. string.rep('d', b - a + 1), unpack(scores, a, b))
  end
  out[i] = {table.concat(ids, "\\255"), table.concat(packed)}
end
return out
"""

# One shard's co-click reference and the decayed clicks of some of its items. KEYS: meta, clicks
# hash. ARGV: the item ids as one JSON array. Returns the reference, then every item's clicks as
# little-endian doubles in one string (NaN for an item never clicked).
_COUNTS = """
local names = cjson.decode(ARGV[1])
local nan = 0 / 0
local packed = {}
for i = 1, #names, 4000 do
  local vals = redis.call('HMGET', KEYS[2], unpack(names, i, math.min(i + 3999, #names)))
  for j = 1, #vals do packed[#packed + 1] = struct.pack('<d', vals[j] and tonumber(vals[j]) or nan) end
end
return {redis.call('HGET', KEYS[1], 'cref') or false, table.concat(packed)}
"""

# One shard's popularity reference and, per popularity list, its size, its top score and the scores
# of some of its items. KEYS: meta, then the lists. ARGV: the item ids as one JSON array.
_POPULARITY = """
local names = cjson.decode(ARGV[1])
local out = {redis.call('HGET', KEYS[1], 'ref') or false}
for k = 2, #KEYS do
  local top = redis.call('ZREVRANGE', KEYS[k], 0, 0, 'WITHSCORES')
  local scores = {}
  for i = 1, #names, 4000 do
    local got = redis.call('ZMSCORE', KEYS[k], unpack(names, i, math.min(i + 3999, #names)))
    for j = 1, #got do scores[#scores + 1] = got[j] end
  end
  out[#out + 1] = {redis.call('ZCARD', KEYS[k]), top[2] or false, scores}
end
return out
"""

# KEYS: catalog meta. ARGV: (partition, offset) pairs; a position never moves back.
_PROGRESS = """
for i = 1, #ARGV, 2 do
  local f = 'pos:' .. ARGV[i]
  if tonumber(redis.call('HGET', KEYS[1], f) or '-1') < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  end
end
return 1
"""

# Remove items from one shard. KEYS: pop, n, scene zsets..., co zsets of the items...
# ARGV: #scene zsets, then the items.
_REMOVE = """
local ns = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  for s = 1, ns do redis.call('ZREM', KEYS[2 + s], ARGV[i]) end
end
for k = 3 + ns, #KEYS do redis.call('DEL', KEYS[k]) end
return 1
"""


def _applied(row: Sequence[Optional[bytes]]) -> int:
    """The published offset from a source's stats watermark and its mark of effects begun."""
    return max((int(v) for v in row if v is not None), default=-1)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower().endswith("+cluster")


def connect(url: str, *, asyncio: bool = True, **options: Any):
    """A redis-py client for ``url``: ``redis+cluster://h:p[,h:p]`` (``rediss+cluster://``) gives a
    cluster client, anything else ``from_url``."""
    if is_cluster_url(url):
        if asyncio:
            from redis.asyncio.cluster import ClusterNode, RedisCluster
        else:
            from redis.cluster import ClusterNode, RedisCluster  # type: ignore[assignment]
        parts = urlsplit(url.replace("+cluster", "", 1))
        nodes = []
        for hp in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hp.rpartition(":")
            nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
        if parts.username and "username" not in options:
            options["username"] = parts.username
        if parts.password and "password" not in options:
            options["password"] = parts.password
        if parts.scheme == "rediss":
            options.setdefault("ssl", True)
        return RedisCluster(startup_nodes=nodes, **options)
    if asyncio:
        import redis.asyncio as aioredis

        return aioredis.from_url(url, **options)
    import redis

    return redis.Redis.from_url(url, **options)


class RedisProfileStore(ProfileStore):
    """Profiles and per-item state in Redis; credentials in the URL or in ``redis_options``
    (redis-py arguments: ``username``, ``password``, ``ssl_ca_certs`` ...)."""

    def __init__(self, url: str, key_prefix: str, options: StoreOptions = StoreOptions(), *,
                 redis_options: Optional[dict] = None) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.url, self.prefix, self.o = url, key_prefix, options
        self.cluster = is_cluster_url(url)
        extra: dict = {"retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 5)}
        self.redis = connect(url, decode_responses=False, socket_timeout=30, **extra, **(redis_options or {}))
        self._commit = self.redis.register_script(_COMMIT)
        self._apply = self.redis.register_script(_APPLY)
        self._learn = self.redis.register_script(_LEARN)
        self._rescale = self.redis.register_script(_RESCALE)
        self._number = self.redis.register_script(_NUMBER)
        self._progress = self.redis.register_script(_PROGRESS)
        self._remove = self.redis.register_script(_REMOVE)
        self._rows = self.redis.register_script(_ROWS)
        self._counts = self.redis.register_script(_COUNTS)
        self._popularity = self.redis.register_script(_POPULARITY)
        self._replica_plan: list[tuple[Any, int]] = []
        self._replicas_at = -1e9

    async def _pipeline(self, build: Callable[[Any], None], raise_on_error: bool = True) -> list:
        """Run the commands that ``build(pipe)`` queues in one non-transactional pipeline (split
        by node on a cluster). Scripts go as EVALSHA (:meth:`_script`): a server that lacks them
        gets them loaded and the pipeline runs again."""
        from redis.exceptions import NoScriptError

        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    rows = await pipe.execute(raise_on_error=raise_on_error)
                except NoScriptError:
                    if attempt:
                        raise
                    await self._load_scripts()
                    continue
            if not raise_on_error and any(isinstance(r, Exception) and "NOSCRIPT" in str(r) for r in rows) and not attempt:
                await self._load_scripts()
                continue
            return rows
        raise AssertionError("unreachable")

    @staticmethod
    def _script(pipe, script, keys: Sequence[str], args: Sequence) -> None:
        """Queue ``script`` on ``pipe`` (cluster pipelines refuse the script object's own call)."""
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load_scripts(self) -> None:
        for script in (self._commit, self._apply, self._learn, self._rescale, self._number, self._progress,
                       self._remove, self._rows, self._counts, self._popularity):
            await self.redis.script_load(script.script)

    # -- keys ----------------------------------------------------------------------------------

    def user_key(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}"

    def shard_key(self, k: int, name: str) -> str:
        return f"{self.prefix}:{{s:{k}}}:{name}"

    def cat_key(self, name: str) -> str:
        return f"{self.prefix}:{{cat}}:{name}"

    def _shard(self, key: str) -> int:
        return shard_of(key, self.o.shards)

    # -- profiles ------------------------------------------------------------------------------

    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        rows = await self._pipeline(lambda pipe: [pipe.get(self.user_key(u)) for u in ids], raise_on_error=False)
        out = {}
        for u, raw in zip(ids, rows, strict=True):
            if isinstance(raw, Exception):
                if "WRONGTYPE" not in str(raw):
                    raise raw
                out[u] = Profile(user_id=u, reset=f"key {self.user_key(u)} holds another type, not a profile record")
            elif raw is None:
                out[u] = Profile(user_id=u)
            else:
                try:
                    p, forgotten = codec.decode(u, raw)
                except codec.CorruptProfile as exc:
                    out[u] = Profile(user_id=u, reset=str(exc))
                    continue
                out[u] = Profile(user_id=u, version=p.version, applied=p.applied) if forgotten else p
        return out

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        if not writes:
            return []
        records = [w.expected % 0xFFFFFFFF + 1 for w in writes]
        plan = await self._replicas()

        def build(pipe) -> None:
            for w, version in zip(writes, records, strict=True):
                ttl = int(self.o.forget_ttl_s * 1000) if w.forgotten else 0
                self._script(pipe, self._commit, [self.user_key(w.profile.user_id)],
                             [struct.pack("<I", w.expected) if w.expected else b"",
                              codec.encode(w.profile, version, forgotten=w.forgotten), ttl, 1 if w.replace else 0])
            self._queue_wait(pipe, plan)

        rows = await self._pipeline(build)
        self._check_wait(plan, rows[len(writes):])
        rows = rows[: len(writes)]
        done = []
        for w, version, ok in zip(writes, records, rows, strict=True):
            if int(ok) == 1:
                w.profile.version = version
            done.append(int(ok) == 1)
        return done

    async def _replicas(self) -> list[tuple[Any, int]]:
        """Each primary (``None`` for a single server) and how many replicas its writes must reach:
        ``wait_replicas``, or fewer while fewer are connected (a promoted replica has none until
        the old primary comes back; its writes then wait for none, and that is logged)."""
        import time

        n = self.o.wait_replicas
        if n <= 0:
            return []
        now = time.monotonic()
        if now - self._replicas_at > 1.0:
            nodes = self.redis.get_primaries() if self.cluster else [None]
            found = []
            for node in nodes:
                info = await (self.redis.info("replication", target_nodes=node) if node is not None
                              else self.redis.info("replication"))
                connected = int(info.get("connected_slaves", 0))
                if connected < n:
                    log.warning("Redis primary %s has %d replicas connected: its writes wait for %d, not %d",
                                getattr(node, "name", self.url), connected, connected, n)
                found.append((node, min(n, connected)))
            self._replica_plan, self._replicas_at = found, now
        return self._replica_plan

    def _queue_wait(self, pipe, plan: list[tuple[Any, int]]) -> int:
        """Queue ``WAIT`` for each primary at the end of ``pipe`` (the writes' own connections);
        returns how many results they add."""
        for node, want in plan:
            kw = {"target_nodes": node} if node is not None else {}
            pipe.execute_command("WAIT", want, 5000, **kw)
        return len(plan)

    @staticmethod
    def _check_wait(plan: list[tuple[Any, int]], got: list) -> None:
        from redis.exceptions import TimeoutError as RedisTimeout

        for (node, want), n in zip(plan, got, strict=True):
            if int(n) < want:
                raise RedisTimeout(f"writes reached {n} of {want} replicas of {getattr(node, 'name', 'Redis')} in 5 s")

    # -- per-item state ------------------------------------------------------------------------

    async def apply(self, effects: Effects) -> None:
        shards: dict[int, dict] = {}

        def shard(k: int) -> dict:
            return shards.setdefault(k, {"scenes": {}, "co": {}, "ops": []})

        for source, offset, c in effects.clicks:
            sh = shard(self._shard(c.item_id))
            si = 0
            if c.scene:
                si = sh["scenes"].setdefault(c.scene, len(sh["scenes"]) + 1)
            sh["ops"] += ["p", source, offset, c.item_id, si, repr(float(c.timestamp)), repr(float(c.weight))]
            for prev in dict.fromkeys(c.previous):
                if prev == c.item_id:
                    continue
                for a, b in ((c.item_id, prev), (prev, c.item_id)):
                    sa = shard(self._shard(a))
                    ci = sa["co"].setdefault("co:" + a, len(sa["co"]) + 1)
                    sa["ops"] += ["c", source, offset, b, ci, repr(float(c.timestamp)), 1]
            for prev, w in transition_weights(c):
                sa = shard(self._shard(prev))
                ci = sa["co"].setdefault("tr:" + prev, len(sa["co"]) + 1)
                sa["ops"] += ["t", source, offset, c.item_id, ci, repr(float(c.timestamp)), repr(w)]
        for source, offset, name, n in effects.stats:
            kind = "r" if name in DELIVERY_STATS else "s"
            shard(self._shard(source))["ops"] += [kind, source, offset, name, 0, n, 0]
        # Marked first: a batch whose effects began to apply is published, its lists go again
        # marked duplicate (a worker killed mid-pipeline leaves some effects applied, and the rest
        # of the batch's lists could not be made from the state before it). On a cluster the
        # nodes run their parts of a pipeline in any order: the marks go in a round trip of their own.
        extent: dict[str, int] = {}
        for source, offset, _, _ in effects.stats:
            extent[source] = max(extent.get(source, -1), offset)

        def mark(pipe) -> None:
            for src, end in extent.items():
                pipe.hset(self.shard_key(self._shard(src), "m"), "a:" + src, end)

        if extent and self.cluster:
            await self._pipeline(mark)
        pending = {k: sh for k, sh in shards.items() if sh["ops"]}
        learn: list = []
        for source, offset, step in effects.learn:
            learn += [source, offset, *(repr(float(v)) for v in step)]
        plan = await self._replicas()
        for attempt in range(4):
            if not pending and not learn:
                break
            order = list(pending)

            def build(pipe, order=order, pending=pending, learn=learn if attempt == 0 else []) -> None:
                if attempt == 0 and extent and not self.cluster:
                    mark(pipe)
                if learn:  # the ranker's steps: an integer reply, before the shards' ones
                    self._script(pipe, self._learn, [self.model_key()], [MODEL_ID, len(FEATURES), *FEATURES, *learn])
                for k in order:
                    sh = pending[k]
                    keys = [self.shard_key(k, "m"), self.shard_key(k, "pop"), self.shard_key(k, "n"),
                            self.shard_key(k, "stats"),
                            *(self.shard_key(k, "pop:" + s) for s in sh["scenes"]),
                            *(self.shard_key(k, name) for name in sh["co"])]
                    args = [self.o.popularity_halflife_s, self.o.cooccur_halflife_s, self.o.cooccur_keep,
                            self.o.popular_keep, len(sh["scenes"]), len(sh["co"]),
                            json.dumps(sh["ops"], separators=(",", ":"), ensure_ascii=False)]
                    self._script(pipe, self._apply, keys, args)
                    if sh["scenes"]:
                        pipe.hset(self.shard_key(k, "m"), mapping={"s:" + s: 1 for s in sh["scenes"]})
                self._queue_wait(pipe, plan)

            rows = await self._pipeline(build)
            if plan:
                self._check_wait(plan, rows[-len(plan):])
                rows = rows[: -len(plan)]
            if attempt == 0 and extent and not self.cluster:
                rows = rows[len(extent):]
            learn = []
            results = [r for r in rows if isinstance(r, bytes)]
            again = {}
            for k, r in zip(order, results, strict=True):
                if r in (b"rescale", b"rescale_co"):
                    await self._rescale_shard(k, pending[k], co=r == b"rescale_co")
                    again[k] = pending[k]
            pending = again
        if pending:
            raise RuntimeError(f"shards {sorted(pending)} kept asking for a new decay reference")

    async def _rescale_shard(self, k: int, sh: dict, co: bool) -> None:
        """Move shard ``k``'s popularity (or co-click) reference up to the batch's latest time."""
        meta = await self.redis.hgetall(self.shard_key(k, "m"))
        meta = {a.decode(): b for a, b in meta.items()}
        times = [float(sh["ops"][i + 5]) for i in range(0, len(sh["ops"]), 7) if sh["ops"][i] in ("p", "c", "t")]
        field, half = ("cref", self.o.cooccur_halflife_s) if co else ("ref", self.o.popularity_halflife_s)
        ref = float(meta[field])
        shift = math.floor((max(times) - ref) / half) - 1
        if shift <= 0:
            return
        if co:
            items = [i.decode() for i in await self.redis.hkeys(self.shard_key(k, "n"))]
            keys = [self.shard_key(k, "n"), *(self.shard_key(k, kind + i) for i in items for kind in ("co:", "tr:"))]
        else:
            scenes = [f[2:] for f in meta if f.startswith("s:")]
            keys = [self.shard_key(k, "pop"), *(self.shard_key(k, "pop:" + s) for s in scenes)]
        log.info("shard %d: moving the %s reference forward by %d half-lives", k, field, shift)
        await self._rescale(keys=[self.shard_key(k, "m"), *keys],
                            args=[field, repr(ref + shift * half), repr(math.pow(2.0, -shift))])

    def model_key(self) -> str:
        return f"{self.prefix}:{{model}}:w"

    async def model(self) -> dict[str, float | str]:
        raw = await self.redis.hgetall(self.model_key())
        out: dict[str, float | str] = {}
        for k, v in raw.items():
            name = k.decode()
            if name == "model":
                out[name] = v.decode()
            elif not name.startswith("w:"):
                out[name] = float(v)
        return out

    async def published(self, sources: Sequence[str]) -> dict[str, int]:
        sources = list(dict.fromkeys(sources))
        if not sources:
            return {}
        rows = await self._pipeline(lambda pipe: [pipe.hmget(self.shard_key(self._shard(src), "m"),
                                                             ["w:" + src, "a:" + src]) for src in sources])
        return {src: _applied(row) for src, row in zip(sources, rows, strict=True)}

    async def begin(self, batch: dict[str, int]) -> dict[str, int]:
        if not batch:
            return {}
        noted = json.dumps(batch, sort_keys=True, separators=(",", ":"))

        def build(pipe) -> None:
            for src in batch:
                pipe.hset(self.shard_key(self._shard(src), "m"), "b:" + src, noted)
                pipe.hmget(self.shard_key(self._shard(src), "m"), ["w:" + src, "a:" + src])

        rows = await self._pipeline(build)
        return {src: _applied(row) for src, row in zip(batch, rows[1::2], strict=True)}

    async def positions(self, sources: Sequence[str]) -> dict[str, tuple[int, dict[str, int]]]:
        sources = list(dict.fromkeys(sources))
        if not sources:
            return {}
        rows = await self._pipeline(lambda pipe: [pipe.hmget(self.shard_key(self._shard(src), "m"),
                                                             ["w:" + src, "a:" + src, "b:" + src]) for src in sources])
        return {src: (_applied(row[:2]), json.loads(row[2]) if row[2] is not None else {})
                for src, row in zip(sources, rows, strict=True)}

    async def number_items(self, item_ids: Sequence[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        nums = await self._number(keys=[self.cat_key("no"), self.cat_key("m")], args=ids)
        return {i: int(n) for i, n in zip(ids, nums, strict=True)}

    async def transitions(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        return {a: [(b, -v) for v, b in sorted(zip((-weights).tolist(), ids))]  # by (-weight, id)
                for a, (ids, weights) in (await self.transitions_arrays(item_ids, n)).items()}

    async def _partner_read(self, kind: str, item_ids: list[str], n: int) -> Optional[tuple[
            dict[str, tuple[list[str], np.ndarray]], dict[str, float], dict[int, float]]]:
        """The raw rows of ``item_ids`` (ids and counts), the decayed clicks of every item they
        name, and each shard's scale to the newest reference; None when no shard has one."""
        # One script call per shard for the rows, then one per shard for the reference and the
        # clicks of every item named (a command per row or per name cost more on the client).
        sources: dict[int, list[str]] = {}
        for a in item_ids:
            sources.setdefault(self._shard(a), []).append(a)
        order = list(sources)
        # Steps are ranked by count over the source's clicks, the same for a whole row: its best
        # ``n`` are its first ``n`` by count (and any within a rounding error of the n-th), read alone.
        top = n if kind == "tr:" and n > 0 else 0
        replies = await self._pipeline(lambda pipe: [
            self._script(pipe, self._rows, [self.shard_key(k, kind + a) for a in sources[k]], [top]) for k in order])
        rows = {a: _joined_row(r) for k, got in zip(order, replies, strict=True) for a, r in zip(sources[k], got, strict=True)}
        names = list({*item_ids, *itertools.chain.from_iterable(ids for ids, _ in rows.values())}) \
            if kind == "co:" else item_ids
        by_shard: dict[int, list[str]] = {k: [] for k in sources}
        for x in names:
            by_shard.setdefault(self._shard(x), []).append(x)
        shards = sorted(by_shard)
        got = await self._pipeline(lambda pipe: [
            self._script(pipe, self._counts, [self.shard_key(k, "m"), self.shard_key(k, "n")],
                         [json.dumps(by_shard[k], separators=(",", ":"), ensure_ascii=False)]) for k in shards])
        crefs = {k: float(r[0]) for k, r in zip(shards, got, strict=True) if r[0] is not None}
        if not crefs:
            return None
        base = max(crefs.values())
        scale = {k: math.pow(2.0, (r - base) / self.o.cooccur_halflife_s) for k, r in crefs.items()}
        counts: dict[str, float] = {}
        for k, r in zip(shards, got, strict=True):
            if k in scale:
                vals = np.frombuffer(r[1], dtype="<f8")
                known = ~np.isnan(vals)
                counts.update(zip(itertools.compress(by_shard[k], known.tolist()), (vals[known] * scale[k]).tolist()))
        return rows, counts, scale

    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        item_ids = list(dict.fromkeys(item_ids))
        if not item_ids:
            return {}
        read = await self._partner_read("co:", item_ids, n)
        if read is None:
            return {a: [] for a in item_ids}
        cols, counts, scale = read
        rows = {}
        for a, (ids, vals) in cols.items():
            f = scale.get(self._shard(a), 0.0)
            rows[a] = list(zip(ids, (vals * f).tolist()))
        return normalised_cooccurrence(rows, counts, n)

    async def cooccurring_arrays(self, item_ids: Sequence[str], n: int) -> dict[str, tuple[list[str], np.ndarray]]:
        if n != 0:
            return await super().cooccurring_arrays(item_ids, n)
        # Every partner, unsorted: normalised_cooccurrence's weights computed as arrays, all rows at once.
        item_ids = list(dict.fromkeys(item_ids))
        read = await self._partner_read("co:", item_ids, 0) if item_ids else None
        out: dict[str, tuple[list[str], np.ndarray]] = {a: ([], np.zeros(0)) for a in item_ids}
        if read is None:
            return out
        cols, counts, scale = read
        get = counts.get
        live = [(a, ids, vals) for a, (ids, vals) in cols.items() if ids and get(a, 0.0) > 0]
        if not live:
            return out
        sizes = [len(ids) for _, ids, _ in live]
        total = sum(sizes)
        partners = list(itertools.chain.from_iterable(ids for _, ids, _ in live))
        c = np.concatenate([vals for _, _, vals in live])
        c = c * np.repeat(np.array([scale.get(self._shard(a), 0.0) for a, _, _ in live]), sizes)  # as c * f
        ca = np.repeat(np.array([get(a) for a, _, _ in live]), sizes)
        cb = np.fromiter(map(get, partners, itertools.repeat(0.0)), dtype=np.float64, count=total)
        keep = cb > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = c / np.sqrt(ca * cb)
        at = 0
        for (a, ids, _), size in zip(live, sizes):
            k = keep[at:at + size]
            out[a] = (list(itertools.compress(ids, k.tolist())), weight[at:at + size][k])
            at += size
        return out

    async def transitions_arrays(self, item_ids: Sequence[str], n: int) -> dict[str, tuple[list[str], np.ndarray]]:
        # normalised_transitions' weights computed as arrays: each row's best n by (-weight, id)
        item_ids = list(dict.fromkeys(item_ids))
        read = await self._partner_read("tr:", item_ids, n) if item_ids and n > 0 else None
        out: dict[str, tuple[list[str], np.ndarray]] = {a: ([], np.zeros(0)) for a in item_ids}
        if read is None:
            return out
        cols, counts, scale = read
        for a, (ids, vals) in cols.items():
            ca = counts.get(a, 0.0)
            if not ids or ca <= 0:
                continue
            weight = vals * scale.get(self._shard(a), 0.0) / ca
            if len(ids) > n:
                ids, weight = _best(ids, weight, n)
            out[a] = (ids, weight)
        return out

    async def item_clicks(self, item_ids: Sequence[str], at: float) -> dict[str, float]:
        by_shard: dict[int, list[str]] = {}
        for i in dict.fromkeys(item_ids):
            by_shard.setdefault(self._shard(i), []).append(i)
        if not by_shard:
            return {}
        shards = list(by_shard)

        def build(pipe) -> None:
            for k in shards:
                pipe.hget(self.shard_key(k, "m"), "cref")
                pipe.hmget(self.shard_key(k, "n"), by_shard[k])

        got = await self._pipeline(build)
        out: dict[str, float] = {}
        for j, k in enumerate(shards):
            cref, vals = got[2 * j], got[2 * j + 1]
            f = math.pow(2.0, (float(cref) - at) / self.o.cooccur_halflife_s) if cref is not None else 0.0
            for i, v in zip(by_shard[k], vals, strict=True):
                out[i] = float(v) * f if v is not None else 0.0
        return out

    async def popular(self, scene: Optional[str], n: int, enough: Optional[int] = None) -> list[tuple[str, float]]:
        return (await self.popular_many([scene], n, enough))[scene]

    async def popular_many(self, scenes: Sequence[Optional[str]], n: int,
                           enough: Optional[int] = None) -> dict[Optional[str], list[tuple[str, float]]]:
        S = self.o.shards
        scenes = list(dict.fromkeys(scenes))
        named = [s for s in scenes if s]
        per = 1 + len(named)  # per shard: the reference time, then each named scene's list size

        def first(pipe) -> None:
            for k in range(S):
                pipe.hget(self.shard_key(k, "m"), "ref")
                for s in named:
                    pipe.zcard(self.shard_key(k, "pop:" + s))

        rows = await self._pipeline(first)
        refs = {k: float(rows[k * per]) for k in range(S) if rows[k * per] is not None}
        if not refs or n <= 0:
            return {s: [] for s in scenes}
        enough = n if enough is None else enough
        size = {s: sum(int(rows[k * per + 1 + j]) for k in range(S)) for j, s in enumerate(named)}
        list_of = {s: "pop:" + s if s and size[s] >= enough else "pop" for s in scenes}
        base = max(refs.values())
        factor = {k: math.pow(2.0, (r - base) / self.o.popularity_halflife_s) for k, r in refs.items()}
        # Each shard's top entries of each list read, merged: a shard is asked for more only while
        # all it gave ranks above the n-th best so far (one round trip unless popularity is
        # lopsided across shards).
        names = list(dict.fromkeys(list_of.values()))
        got: dict[tuple[str, int], list[tuple[str, float]]] = {(name, k): [] for name in names for k in refs}
        ask = {key: max(16, 2 * n // len(refs) + 8) for key in got}
        merged: dict[str, list[tuple[str, float]]] = {}
        pending = list(got)
        while pending:
            fetched = await self._pipeline(lambda pipe: [
                _zrevrange(pipe, self.shard_key(k, name), len(got[name, k]), ask[name, k] - 1) for name, k in pending])
            for (name, k), rs in zip(pending, fetched, strict=True):
                f = factor[k]
                got[name, k] += [(i, sc * f) for i, sc in _scored(rs)]
            cutoff = {}
            for name in {name for name, _ in pending}:
                merged[name] = sorted((kv for k in refs for kv in got[name, k]), key=lambda kv: (-kv[1], kv[0]))
                cutoff[name] = merged[name][n - 1][1] if len(merged[name]) >= n else -math.inf
            pending = [(name, k) for name, k in pending
                       if len(got[name, k]) == ask[name, k] and got[name, k][-1][1] >= cutoff[name]]
            for key in pending:
                ask[key] *= 4
        return {s: merged[list_of[s]][:n] for s in scenes}

    async def popularity(self, item_ids: Sequence[str], scene: Optional[str], enough: int) -> dict[str, float]:
        return (await self.popularity_many({scene: item_ids}, enough))[scene]

    async def popularity_many(self, items: Mapping[Optional[str], Sequence[str]],
                              enough: int) -> dict[Optional[str], dict[str, float]]:
        S = self.o.shards
        scenes = list(items)
        by_shard: dict[Optional[str], dict[int, list[str]]] = {}
        for scene in scenes:
            by_shard[scene] = {k: [] for k in range(S)}
            for i in dict.fromkeys(items[scene]):
                by_shard[scene][self._shard(i)].append(i)

        def build(pipe) -> None:  # one script call per shard and scene
            for scene in scenes:
                names = ["pop", "pop:" + scene] if scene else ["pop"]
                for k in range(S):
                    self._script(pipe, self._popularity,
                                 [self.shard_key(k, "m"), *(self.shard_key(k, n) for n in names)],
                                 [json.dumps(by_shard[scene][k], separators=(",", ":"), ensure_ascii=False)])

        replies = await self._pipeline(build) if scenes else []
        out: dict[Optional[str], dict[str, float]] = {}
        for j, scene in enumerate(scenes):
            got = replies[j * S:(j + 1) * S]
            item_ids = items[scene]
            refs = {k: float(r[0]) for k, r in enumerate(got) if r[0] is not None}
            if not refs:
                out[scene] = {i: 0.0 for i in item_ids}
                continue
            use = 1 if scene and sum(int(r[2][0]) for r in got) >= enough else 0
            base = max(refs.values())
            factor = {k: math.pow(2.0, (r - base) / self.o.popularity_halflife_s) for k, r in refs.items()}
            top, scores = 0.0, {}
            for k, r in enumerate(got):
                _, best, vals = r[1 + use]
                f = factor.get(k, 0.0)
                if best is not None:
                    top = max(top, float(best) * f)
                scores.update((i, float(v) * f) for i, v in zip(by_shard[scene][k], vals, strict=True) if v is not None)
            out[scene] = {i: scores.get(i, 0.0) / top for i in item_ids} if top > 0 else {i: 0.0 for i in item_ids}
        return out

    # -- catalog -------------------------------------------------------------------------------

    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        if not items:
            return
        cats = {c for _, _, c in items if c}

        def build(pipe) -> None:
            pipe.zadd(self.cat_key("new"), {i: t for i, t, _ in items})
            pipe.zremrangebyrank(self.cat_key("new"), 0, -(self.o.newest_keep + 1))
            if cats:
                pipe.sadd(self.cat_key("cats"), *cats)

        await self._pipeline(build)

    async def remove_items(self, item_ids: Sequence[str]) -> None:
        if not item_ids:
            return
        by_shard: dict[int, list[str]] = {}
        for i in dict.fromkeys(item_ids):
            by_shard.setdefault(self._shard(i), []).append(i)
        metas = await self._pipeline(lambda pipe: [pipe.hkeys(self.shard_key(k, "m")) for k in by_shard])

        def build(pipe) -> None:
            pipe.zrem(self.cat_key("new"), *item_ids)
            for (k, ids), fields in zip(by_shard.items(), metas, strict=True):
                scenes = [f.decode()[2:] for f in fields if f.startswith(b"s:")]
                keys = [self.shard_key(k, "pop"), self.shard_key(k, "n"),
                        *(self.shard_key(k, "pop:" + s) for s in scenes),
                        *(self.shard_key(k, kind + i) for i in ids for kind in ("co:", "tr:"))]
                self._script(pipe, self._remove, keys, [len(scenes), *ids])

        await self._pipeline(build)

    async def newest(self, n: int) -> list[tuple[str, float]]:
        rows = await self.redis.zrevrange(self.cat_key("new"), 0, n - 1, withscores=True)
        return [(k.decode(), float(s)) for k, s in rows]

    async def category_count(self) -> int:
        return int(await self.redis.scard(self.cat_key("cats")))

    async def catalog_progress(self) -> dict[int, int]:
        raw = await self.redis.hgetall(self.cat_key("m"))
        return {int(k[4:]): int(v) for k, v in raw.items() if k.startswith(b"pos:")}

    async def set_catalog_progress(self, progress: dict[int, int]) -> None:
        if progress:
            await self._progress(keys=[self.cat_key("m")], args=[x for kv in progress.items() for x in kv])

    # -- stats and inspection ------------------------------------------------------------------

    async def stats(self) -> dict[str, int]:
        rows = await self._pipeline(lambda pipe: [pipe.hgetall(self.shard_key(k, "stats"))
                                                  for k in range(self.o.shards)])
        out = {k: 0 for k in STAT_FIELDS}
        for raw in rows:
            for k, v in raw.items():
                out[k.decode()] = out.get(k.decode(), 0) + int(v)
        return out

    async def memory_usage(self, user_id: str) -> int:
        return int(await self.redis.memory_usage(self.user_key(user_id), samples=0) or 0)

    async def close(self) -> None:
        await self.redis.aclose()


def read_stats(client, key_prefix: str, shards: int = StoreOptions.shards) -> dict[str, int]:
    """The worker counters through a synchronous redis-py client (tools and tests)."""
    out = {k: 0 for k in STAT_FIELDS}
    pipe = client.pipeline(transaction=False)
    for k in range(shards):
        pipe.hgetall(f"{key_prefix}:{{s:{k}}}:stats")
    for raw in pipe.execute():
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else k
            out[name] = out.get(name, 0) + int(v)
    return out


def _zrevrange(pipe, key: str, start: int, end: int) -> None:
    """Queue ZREVRANGE ... WITHSCORES without redis-py's reply conversion (:func:`_scored` reads it):
    on RESP3 that conversion formats every score to text and parses it back."""
    pipe.execute_command("ZREVRANGE", key, start, end, "WITHSCORES")


def _joined_row(reply: Any) -> tuple[list[str], np.ndarray]:
    """The members and the scores of a row as ``_ROWS`` joins them."""
    ids, scores = reply
    if not ids:
        return [], np.zeros(0)
    return ids.decode("utf-8", "surrogateescape").split("\udcff"), np.frombuffer(scores, dtype="<f8").astype(np.float64)


def _best(ids: list[str], weight: np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
    """The ``n`` best of a row by (-weight, id), in any order: every weight above the n-th, then
    the first of those equal to it by id."""
    nth = np.partition(weight, len(weight) - n)[len(weight) - n]
    above = np.flatnonzero(weight > nth)
    tied = sorted(np.flatnonzero(weight == nth).tolist(), key=ids.__getitem__)[: n - len(above)]
    keep = np.concatenate([above, np.array(tied, dtype=np.int64)])
    return [ids[j] for j in keep.tolist()], weight[keep]


def _scored(reply: Any) -> list[tuple[str, float]]:
    """(member, score) pairs of a raw ZREVRANGE ... WITHSCORES reply: RESP3 nests each pair with its
    score as a double, RESP2 alternates members and scores as text."""
    if not reply:
        return []
    if isinstance(reply[0], (list, tuple)):
        return [(m.decode(), float(sc)) for m, sc in reply]
    return list(zip(map(bytes.decode, reply[0::2]), map(float, reply[1::2])))
