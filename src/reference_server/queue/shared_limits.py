"""Rate limits and stream leases kept in Redis, so every front end of a queue sees the same counts.

Keys (under the queue's prefix)::

    {p}:rate:{client}     hash tokens, at: the client's token bucket (expires once it would be full)
    {p}:leases:{client}   sorted set lease id → expiry (epoch seconds): the client's open streams

Each operation is one Lua script, so two front ends admitting the same client at once cannot both take
the last token or the last lease. Times come from the caller (``now``, epoch seconds: front ends on one
machine, or with synchronised clocks, agree on it), never from inside a script, so tests set them.

A lease's score is its expiry: a front end renews the leases of its open streams well within
``lease_ttl_s``, so a front end that dies (or loses Redis) frees its clients' leases within that time,
and every acquire first drops the lapsed ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from reference_server.admission import Acquired
from reference_server.queue.front import QueueFront, QueueUnavailable
from reference_server.queue.redis_streams import RedisStreams

log = logging.getLogger("reference_server.queue")

# KEYS[1] bucket; ARGV rate, burst, now. Returns the seconds to wait as a string ("0" when granted):
# Lua numbers come back from Redis as integers, which would round a wait of 0.4 s to 0.
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""

# KEYS[1] leases; ARGV now, limit, lease id, expiry, key ttl ms. Returns {granted 0/1, held, lapsed}.
_ACQUIRE = """
local lapsed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return {0, held, lapsed} end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return {1, held + 1, lapsed}
"""


@dataclass
class RedisLimits:
    """``admission.SharedLimits`` on Redis; Redis unreachable is ``QueueUnavailable`` (503), never a 500."""

    client: aioredis.Redis
    url: str
    prefix: str = "inferbench"

    def __post_init__(self) -> None:
        self._take = self.client.register_script(_TAKE)
        self._acquire = self.client.register_script(_ACQUIRE)

    def _bucket(self, client: str) -> str:
        return f"{self.prefix}:rate:{client}"

    def _leases(self, client: str) -> str:
        return f"{self.prefix}:leases:{client}"

    async def take(self, client: str, rate: float, burst: float, now: float) -> float:
        """Take a token from ``client``'s bucket: 0.0 when granted, else the seconds until one comes.

        Raises:
            QueueUnavailable: Redis cannot be reached.
        """
        try:
            reply: Any = await self._take(keys=[self._bucket(client)], args=[repr(rate), repr(burst), repr(now)])
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None
        return float(reply.decode() if isinstance(reply, bytes) else reply)

    async def acquire(self, client: str, lease_id: str, limit: int, expires_at: float, now: float) -> Acquired:
        """Add lease ``lease_id`` (lapsing at ``expires_at``) unless ``client`` holds ``limit`` live ones.

        Raises:
            QueueUnavailable: Redis cannot be reached.
        """
        key_ttl_ms = max(1, math.ceil((expires_at - now) * 1000)) + 1000
        args = [repr(now), str(limit), lease_id, repr(expires_at), str(key_ttl_ms)]
        try:
            granted, held, lapsed = await self._acquire(keys=[self._leases(client)], args=args)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None
        return Acquired(bool(granted), int(held), int(lapsed))

    async def release(self, client: str, lease_id: str) -> None:
        """Give a lease back; with Redis away it lapses by itself at its expiry."""
        try:
            await self.client.zrem(self._leases(client), lease_id)
        except (RedisError, OSError) as exc:
            log.warning("could not release a stream lease of %s (%s); it lapses by itself", client, exc)

    async def renew(self, leases: list[tuple[str, str, float]], now: float) -> None:
        """Move each (client, lease id, new expiry) lease's expiry; a lease that lapsed meanwhile stays gone."""
        if not leases:
            return
        with contextlib.suppress(RedisError, OSError):  # the next renewal tries again; leases lapse if it never does
            async with self.client.pipeline(transaction=False) as pipe:
                for client, lease_id, expires_at in leases:
                    key = self._leases(client)
                    pipe.zadd(key, {lease_id: expires_at}, xx=True)
                    pipe.pexpire(key, max(1, math.ceil((expires_at - now) * 1000)) + 1000, gt=True)
                await pipe.execute()


def shared_limits_of(front: QueueFront) -> RedisLimits | None:
    """The front end's queue as the store of shared limits; None on the in-process queue (one process)."""
    if not isinstance(front.streams, RedisStreams):
        return None
    return RedisLimits(front.streams.client, front.url, front.streams.prefix)
