"""The Redis profile store.

Keys (``P`` is the key prefix; ``{u:ID}`` is a hash tag, so one user's keys share a cluster slot):
``P:{u:ID}:p`` hash of profile fields and version ``v``; ``P:{u:ID}:seen`` set of seen items;
``P:{u:ID}:ev`` sorted set of applied event ids (the last ``dedupe_window``);
``P:pop`` / ``P:pop:s:<scene>`` decayed popularity; ``P:co:<item>`` sorted set of the items
clicked by the same users and ``P:clicks`` clicks per item; ``P:new`` newest items; ``P:cats``
categories; ``P:stats`` counters.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from models.profile import Profile
from streams.stores.profiles import (STAT_FIELDS, CoClick, ConflictError, PopularityUpdate, ProfileStore,
                                     cooccur_pairs, decode_profile, encode_profile, normalised_cooccurrence)

# KEYS: profile hash, seen set, applied-events zset.
# ARGV: expected version, dedupe window, #fields, #seen, #events, field/value pairs, seen ids, event ids.
_COMMIT = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 end
local nf, ns, ne = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local base = 6
local ev0 = base + 2 * nf + ns
for j = 0, ne - 1 do
  if redis.call('ZSCORE', KEYS[3], ARGV[ev0 + j]) then return -2 end
end
for j = 0, nf - 1 do
  redis.call('HSET', KEYS[1], ARGV[base + 2 * j], ARGV[base + 2 * j + 1])
end
for j = 0, ns - 1 do
  redis.call('SADD', KEYS[2], ARGV[base + 2 * nf + j])
end
local seq = redis.call('HINCRBY', KEYS[1], 'evseq', ne)
for j = 0, ne - 1 do
  redis.call('ZADD', KEYS[3], seq - ne + j + 1, ARGV[ev0 + j])
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[2]) + 1))
redis.call('HSET', KEYS[1], 'v', v + 1)
return v + 1
"""

# KEYS: reference-time key, global popularity key. ARGV: halflife, scene key prefix, then
# (item, scene or '', timestamp, weight) quadruples. Scores are weight * 2^((t - ref) / halflife);
# when that exponent grows past 64 every score is rescaled and the reference moves forward.
_BUMP = """
local half = tonumber(ARGV[1])
local ref = tonumber(redis.call('GET', KEYS[1]) or '')
local function rescale(key, factor)
  local rows = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #rows, 2 do
    redis.call('ZADD', key, tonumber(rows[i + 1]) * factor, rows[i])
  end
end
for i = 3, #ARGV, 4 do
  local item, scene, t, w = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if not ref then
    ref = t
    redis.call('SET', KEYS[1], ref)
  end
  local e = (t - ref) / half
  if e > 64 then
    local shift = math.floor(e)
    local factor = math.pow(2, -shift)
    rescale(KEYS[2], factor)
    for _, sk in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':scenes')) do rescale(sk, factor) end
    ref = ref + shift * half
    redis.call('SET', KEYS[1], ref)
    e = (t - ref) / half
  end
  local s = w * math.pow(2, e)
  redis.call('ZINCRBY', KEYS[2], s, item)
  if scene ~= '' then
    local sk = ARGV[2] .. scene
    redis.call('SADD', KEYS[1] .. ':scenes', sk)
    redis.call('ZINCRBY', sk, s, item)
  end
end
return 1
"""


# KEYS: clicks-per-item hash. ARGV: partners kept per item, co-click key prefix, #clicked items,
# the clicked items, then (a, b) pairs.
_CO = """
local keep, prefix, m = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + m do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end
local touched = {}
for i = 4 + m, #ARGV, 2 do
  local key = prefix .. ARGV[i]
  redis.call('ZINCRBY', key, 1, ARGV[i + 1])
  touched[key] = true
end
for key in pairs(touched) do redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1)) end
return 1
"""


class RedisProfileStore(ProfileStore):
    """Profiles in Redis (``redis://``, ``rediss://`` for TLS, ``unix://``); credentials in the URL
    or in ``options`` (redis-py arguments: ``username``, ``password``, ``ssl_ca_certs`` ...)."""

    def __init__(self, url: str, key_prefix: str, *, dedupe_window: int = 10_000,
                 popularity_halflife_s: float = 6 * 3600.0, cooccur_keep: int = 200,
                 options: Optional[dict] = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.url = url
        self.prefix = key_prefix
        self.dedupe_window = dedupe_window
        self.halflife = popularity_halflife_s
        self.cooccur_keep = cooccur_keep
        self.redis = aioredis.from_url(url, decode_responses=False, socket_timeout=30,
                                       retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 5), **(options or {}))
        self._commit = self.redis.register_script(_COMMIT)
        self._bump = self.redis.register_script(_BUMP)
        self._co = self.redis.register_script(_CO)

    def _user(self, user_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:{{u:{user_id}}}"
        return base + ":p", base + ":seen", base + ":ev"

    async def load(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        ids = list(dict.fromkeys(user_ids))
        async with self.redis.pipeline(transaction=False) as pipe:
            for u in ids:
                p, seen, _ = self._user(u)
                pipe.hgetall(p)
                pipe.smembers(seen)
            rows = await pipe.execute()
        return {u: decode_profile(u, rows[2 * i], rows[2 * i + 1]) for i, u in enumerate(ids)}

    async def applied(self, user_ids_event_ids: Sequence[tuple[str, str]]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for u, e in user_ids_event_ids:
                pipe.zscore(self._user(u)[2], e)
            rows = await pipe.execute()
        return [r is not None for r in rows]

    async def commit(self, profile: Profile, expected_version: int, new_seen: Iterable[str],
                     event_ids: Sequence[str]) -> int:
        fields = encode_profile(profile)
        seen = list(new_seen)
        args: list = [expected_version, self.dedupe_window, len(fields), len(seen), len(event_ids)]
        for k, v in fields.items():
            args += [k, v]
        args += seen
        args += list(event_ids)
        result = int(await self._commit(keys=list(self._user(profile.user_id)), args=args))
        if result == -1:
            raise ConflictError(f"profile of {profile.user_id!r} changed since version {expected_version}")
        if result == -2:
            raise ConflictError(f"an event of {profile.user_id!r} was applied concurrently")
        profile.version = result
        return result

    async def forget(self, user_id: str) -> None:
        await self.redis.delete(*self._user(user_id))

    async def bump_cooccurrence(self, clicks: Sequence[CoClick]) -> None:
        if not clicks:
            return
        pairs = cooccur_pairs(clicks)
        args: list = [self.cooccur_keep, f"{self.prefix}:co:", len(clicks), *(c.item_id for c in clicks)]
        for a, b in pairs:
            args += [a, b]
        await self._co(keys=[f"{self.prefix}:clicks"], args=args)

    async def cooccurring(self, item_ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        item_ids = list(dict.fromkeys(item_ids))
        if not item_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for a in item_ids:
                pipe.zrevrange(f"{self.prefix}:co:{a}", 0, -1, withscores=True)
            raw = await pipe.execute()
        rows = {a: [(b.decode(), float(c)) for b, c in r] for a, r in zip(item_ids, raw, strict=True)}
        names = list({*item_ids, *(b for r in rows.values() for b, _ in r)})
        got = await self.redis.hmget(f"{self.prefix}:clicks", names)
        counts = {k: float(v) for k, v in zip(names, got, strict=True) if v is not None}
        return normalised_cooccurrence(rows, counts, n)

    async def bump_popularity(self, updates: Sequence[PopularityUpdate]) -> None:
        if not updates:
            return
        args: list = [self.halflife, f"{self.prefix}:pop:s:"]
        for u in updates:
            args += [u.item_id, u.scene or "", repr(float(u.timestamp)), repr(float(u.weight))]
        await self._bump(keys=[f"{self.prefix}:pop:ref", f"{self.prefix}:pop"], args=args)

    async def popular(self, scene: Optional[str], n: int) -> list[tuple[str, float]]:
        key = f"{self.prefix}:pop"
        if scene:
            skey = f"{self.prefix}:pop:s:{scene}"
            if await self.redis.zcard(skey) >= n:
                key = skey
        rows = await self.redis.zrevrange(key, 0, n - 1, withscores=True)
        return [(k.decode(), float(s)) for k, s in rows]

    async def add_items(self, items: Sequence[tuple[str, float, str]]) -> None:
        if not items:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(f"{self.prefix}:new", {i: t for i, t, _ in items})
            cats = {c for _, _, c in items if c}
            if cats:
                pipe.sadd(f"{self.prefix}:cats", *cats)
            await pipe.execute()

    async def remove_items(self, item_ids: Sequence[str], scenes: Sequence[str]) -> None:
        if not item_ids:
            return
        scene_keys = await self.redis.smembers(f"{self.prefix}:pop:ref:scenes")
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in [f"{self.prefix}:new", f"{self.prefix}:pop", *(k.decode() for k in scene_keys)]:
                pipe.zrem(key, *item_ids)
            # an item without a click count is never a co-click candidate
            pipe.hdel(f"{self.prefix}:clicks", *item_ids)
            pipe.delete(*(f"{self.prefix}:co:{i}" for i in item_ids))
            await pipe.execute()

    async def newest(self, n: int) -> list[tuple[str, float]]:
        rows = await self.redis.zrevrange(f"{self.prefix}:new", 0, n - 1, withscores=True)
        return [(k.decode(), float(s)) for k, s in rows]

    async def category_count(self) -> int:
        return int(await self.redis.scard(f"{self.prefix}:cats"))

    async def incr_stats(self, counts: dict[str, int]) -> None:
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for k, v in counts.items():
                pipe.hincrby(f"{self.prefix}:stats", k, v)
            await pipe.execute()

    async def stats(self) -> dict[str, int]:
        raw = await self.redis.hgetall(f"{self.prefix}:stats")
        out = {k: 0 for k in STAT_FIELDS}
        out.update({k.decode(): int(v) for k, v in raw.items()})
        return out

    async def close(self) -> None:
        await self.redis.aclose()


