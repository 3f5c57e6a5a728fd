"""Token buckets in Redis, shared by every replica: one Lua script reads, refills, checks and
takes from all of a request's buckets atomically, on Redis' own clock (`TIME`), so replicas
with skewed clocks agree."""

from __future__ import annotations

import asyncio

from serving.ratelimit.buckets import REQUESTS, Bucket, Decision, RateLimiterUnavailable

# KEYS: the buckets. ARGV[1]: "admit" or "charge"; ARGV[2]: tokens to charge; then for each
# bucket its capacity and whether it is a request bucket (1) or a token bucket (0).
# Returns {allowed (0/1), wait seconds, level of each bucket...} as strings (floats survive).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode, charge = ARGV[1], tonumber(ARGV[2])
local levels, wait = {}, 0
for i = 1, #KEYS do
  local cap = tonumber(ARGV[1 + 2 * i])
  local rate = cap / 60
  local v = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  level = math.min(cap, level + math.max(0, now - ts) * rate)
  levels[i] = level
  if mode == 'admit' and level < 1 then wait = math.max(wait, (1 - level) / rate) end
end
local out = {}
if mode == 'admit' and wait > 0 then
  out[1], out[2] = '0', tostring(wait)
  for i = 1, #KEYS do out[2 + i] = tostring(levels[i]) end
  return out
end
for i = 1, #KEYS do
  local cap = tonumber(ARGV[1 + 2 * i])
  local is_request = ARGV[2 + 2 * i] == '1'
  local level = levels[i]
  if mode == 'admit' and is_request then level = level - 1 end
  if mode == 'charge' and not is_request then level = level - charge end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[i], math.ceil(60 * (cap - level) / cap) + 60)
  out[2 + i] = tostring(level)
end
out[1], out[2] = '1', '0'
return out
"""


class RedisRateLimiter:
    def __init__(self, url: str, prefix: str = "tessera:ratelimit:"):
        self.url, self.prefix = url, prefix
        self._client = None
        self._script = None
        self._loop = None

    def describe(self) -> str:
        return f"redis {self.url.split('@')[-1]}"

    def _redis(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aioredis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            self._script = self._client.register_script(_SCRIPT)
            self._loop = loop
        return self._client

    async def _run(self, mode: str, buckets: list[Bucket], tokens: int = 0) -> list[float]:
        import redis

        self._redis()
        args: list = [mode, tokens]
        for b in buckets:
            args += [b.capacity, 1 if b.kind == REQUESTS else 0]
        try:
            reply = await self._script(keys=[self.prefix + b.name for b in buckets], args=args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise RateLimiterUnavailable(f"the rate limiter's Redis ({self.describe()}) is unreachable: {e}") from e
        return [float(x) for x in reply]

    async def admit(self, buckets: list[Bucket]) -> Decision:
        if not buckets:
            return Decision(True)
        allowed, wait, *levels = await self._run("admit", buckets)
        return Decision(allowed == 1.0, wait, dict(zip(buckets, levels)))

    async def charge(self, buckets: list[Bucket], tokens: int) -> None:
        token_buckets = [b for b in buckets if b.kind != REQUESTS]
        if token_buckets and tokens > 0:
            await self._run("charge", token_buckets, tokens)

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:
                pass
            self._client = None
