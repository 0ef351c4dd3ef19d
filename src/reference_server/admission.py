"""Admission: who is asking, how fast they may ask, and how many streams they may hold.

Policy apart from time: ``TokenBucket`` and ``LeaseTable`` take ``now`` (or a clock) and never sleep, so
tests drive them with a manual clock. Buckets refill lazily, when their client next asks, so an idle
client costs nothing and the hot path is one dict lookup and a little arithmetic.

A client's identity (``X-Client-Id``, else a digest of its API key, else its peer address) is used for
limits and A/B routing only — never as a metrics label, whose cardinality must stay bounded.

In queue mode on Redis the generation routes take their tokens and leases from ``SharedLimits`` (the
``*_shared`` methods), so every front end sees the same counts; elsewhere those methods are the in-memory
ones. Shared leases are renewed by their front end (``keep_shared_leases``) and lapse if it dies.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from reference_server.errors import RateLimited, TooManyStreams
from reference_server.metrics import ServerMetrics

Clock = Callable[[], float]

_CLIENT_ID_MAX = 128


def client_identity(raw_headers: Iterable[tuple[bytes, bytes]], peer_host: str | None) -> str:
    """The identity a request is limited and routed by.

    ``X-Client-Id`` wins; then an API key (``Authorization: Bearer`` or ``X-API-Key``), kept only as a
    digest so the key itself is not held in the server's tables; then the peer's address (not its port:
    a client opens many connections). ``raw_headers`` are the ASGI scope's (names lowercased): one pass
    over them costs far less than building Starlette's ``Headers`` (measured ~5 µs a request).
    """
    key = b""
    for name, value in raw_headers:
        if name == b"x-client-id" and value:
            return "id:" + value[:_CLIENT_ID_MAX].decode("latin-1")
        if name == b"x-api-key" and value:
            key = value
        elif name == b"authorization" and not key and value[:7].lower() == b"bearer ":
            key = value[7:].strip()
    if key:
        return "key:" + hashlib.blake2b(key, digest_size=8).hexdigest()
    return "peer:" + (peer_host or "unknown")


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; one request takes one token."""

    tokens: float
    updated_at: float

    def take(self, now: float, rate: float, burst: float) -> float:
        """Take a token: 0.0 when granted, else the seconds until one will be there."""
        elapsed = now - self.updated_at
        if elapsed > 0:
            self.tokens = min(burst, self.tokens + elapsed * rate)
            self.updated_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class RateLimiter:
    """A token bucket per client, created on first use and forgotten once idle long enough to be full."""

    def __init__(self, rate_per_s: float, burst: float, *, max_clients: int) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, client: str, now: float) -> float:
        """0.0 when ``client`` may go ahead, else the seconds it should wait."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._forget_idle(now)
            bucket = self._buckets[client] = TokenBucket(self.burst, now)
        return bucket.take(now, self.rate, self.burst)

    def _forget_idle(self, now: float) -> None:
        # A bucket idle for burst/rate seconds is full again: dropping it changes nothing for its client.
        full_after = self.burst / self.rate
        self._buckets = {c: b for c, b in self._buckets.items() if now - b.updated_at < full_after}
        if len(self._buckets) >= self.max_clients:  # a flood of live clients: keep the newest half
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1].updated_at)[self.max_clients // 2 :]
            self._buckets = dict(keep)


@dataclass(eq=False, slots=True)
class Lease:
    """The right to one concurrent stream; lapses at ``expires_at`` so a crashed holder cannot leak it."""

    client: str
    id: int
    expires_at: float
    released: bool = field(default=False)


class LeaseTable:
    """At most ``limit`` unexpired leases per client."""

    def __init__(self, limit: int, ttl_s: float, clock: Clock) -> None:
        self.limit = limit
        self.ttl_s = ttl_s
        self._clock = clock
        self._held: dict[str, list[Lease]] = {}
        self._ids = itertools.count()
        self.expired = 0  # leases reclaimed by their TTL rather than released

    def held(self, client: str) -> int:
        return len(self._held.get(client, ()))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self._held.values())

    def acquire(self, client: str) -> Lease:
        """A lease for one stream of ``client``.

        Raises:
            TooManyStreams: ``client`` already holds ``limit`` unexpired leases.
        """
        now = self._clock()
        leases = self._held.setdefault(client, [])
        if leases and leases[0].expires_at <= now:
            self._drop_expired(client, now)
            leases = self._held.setdefault(client, [])
        if len(leases) >= self.limit:
            # When a stream ends is unknowable here; one second is a polite guess.
            raise TooManyStreams(f"this client already has {len(leases)} streams open (limit {self.limit})")
        lease = Lease(client, next(self._ids), now + self.ttl_s)
        leases.append(lease)  # in expiry order: every lease gets the same TTL
        return lease

    def release(self, lease: Lease) -> None:
        """Give a lease back; releasing twice, or after it lapsed, does nothing."""
        if lease.released:
            return
        lease.released = True
        leases = self._held.get(lease.client)
        if leases is not None and lease in leases:
            leases.remove(lease)
            if not leases:
                del self._held[lease.client]

    def sweep(self, now: float) -> int:
        """Reclaim every lapsed lease (the sweeper calls this); returns how many."""
        before = self.expired
        for client in [c for c, leases in self._held.items() if leases and leases[0].expires_at <= now]:
            self._drop_expired(client, now)
        return self.expired - before

    def _drop_expired(self, client: str, now: float) -> None:
        leases = self._held.get(client, [])
        alive = [lease for lease in leases if lease.expires_at > now]
        for lease in leases:
            if lease.expires_at <= now:
                lease.released = True
        self.expired += len(leases) - len(alive)
        if alive:
            self._held[client] = alive
        else:
            self._held.pop(client, None)


@dataclass(frozen=True)
class Acquired:
    """A shared lease acquire's answer."""

    granted: bool
    held: int  # the client's leases after this acquire (or at the refusal)
    lapsed: int  # leases this acquire found expired and dropped


class SharedLimits(Protocol):
    """Token buckets and leases every front end shares (``queue.shared_limits.RedisLimits``).

    Times are epoch seconds from the caller. ``take`` and ``acquire`` raise ``Overloaded`` (503) when
    the store cannot be reached; ``release`` and ``renew`` never raise (a lease lapses by itself).
    """

    async def take(self, client: str, rate: float, burst: float, now: float) -> float: ...
    async def acquire(self, client: str, lease_id: str, limit: int, expires_at: float, now: float) -> Acquired: ...
    async def release(self, client: str, lease_id: str) -> None: ...
    async def renew(self, leases: list[tuple[str, str, float]], now: float) -> None: ...


@dataclass(eq=False, slots=True)
class SharedLease:
    """A lease in ``SharedLimits``; ``deadline`` (epoch seconds) caps its renewals at ``stream_lease_ttl_s``."""

    client: str
    id: str
    deadline: float
    released: bool = field(default=False)

    def expiry(self, now: float, renew_ttl_s: float) -> float:
        return min(self.deadline, now + renew_ttl_s)


class Admission:
    """The per-client gate in front of every model route; free when both limits are off (the default).

    Args:
        clock: seconds, monotonic; injected so tests control refills and lease expiry.
    """

    def __init__(
        self,
        *,
        rate_per_s: float | None,
        burst: float,
        max_streams: int | None,
        lease_ttl_s: float,
        max_clients: int,
        metrics: ServerMetrics,
        clock: Clock,
        shared: SharedLimits | None = None,
        shared_lease_ttl_s: float = 30.0,
        wall_clock: Clock = time.time,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self.rate_per_s, self.burst, self.max_streams, self.lease_ttl_s = rate_per_s, burst, max_streams, lease_ttl_s
        self.shared = shared
        self.shared_lease_ttl_s = shared_lease_ttl_s  # a shared lease not renewed within this lapses
        self._wall = wall_clock  # shared limits compare times across processes: epoch seconds
        self._shared_held: set[SharedLease] = set()
        self.limiter = RateLimiter(rate_per_s, burst, max_clients=max_clients) if rate_per_s else None
        self.leases = LeaseTable(max_streams, lease_ttl_s, clock) if max_streams else None
        self._rate_limited = metrics.rejections.child("rate_limited")
        self._too_many_streams = metrics.rejections.child("too_many_streams")

    @property
    def limits_rate(self) -> bool:
        return self.limiter is not None

    def check_rate(self, client: str) -> None:
        """Take one token from ``client``'s bucket.

        Raises:
            RateLimited: the bucket is empty; ``retry_after_s`` says when the next token comes.
        """
        if self.limiter is None:
            return
        wait_s = self.limiter.check(client, self._clock())
        if wait_s > 0:
            self._rate_limited.inc()
            raise RateLimited(
                f"too many requests from this client (limit {self.limiter.rate:g}/s, burst {self.limiter.burst:g})",
                retry_after_s=wait_s,
            )

    def lease(self, client: str) -> Lease | None:
        """A stream lease for ``client``, or None when streams are not limited.

        Raises:
            TooManyStreams: the client holds its limit of streams.
        """
        if self.leases is None:
            return None
        try:
            return self.leases.acquire(client)
        except TooManyStreams:
            self._too_many_streams.inc()
            raise

    def release(self, lease: Lease | None) -> None:
        if lease is not None and self.leases is not None:
            self.leases.release(lease)

    def sweep(self) -> None:
        """Reclaim lapsed leases (called by the sweeper)."""
        if self.leases is not None:
            expired = self.leases.sweep(self._clock())
            if expired:
                self._metrics.lease_expiries.child().inc(expired)

    async def check_rate_shared(self, client: str) -> None:
        """``check_rate`` on the shared bucket (the in-memory one when nothing is shared).

        Raises:
            RateLimited: the bucket is empty.
            Overloaded: the shared store cannot be reached.
        """
        if self.shared is None:
            self.check_rate(client)
            return
        if self.rate_per_s is None:
            return
        wait_s = await self.shared.take(client, self.rate_per_s, self.burst, self._wall())
        if wait_s > 0:
            self._rate_limited.inc()
            raise RateLimited(
                f"too many requests from this client (limit {self.rate_per_s:g}/s, burst {self.burst:g}, "
                "shared by every front end)",
                retry_after_s=wait_s,
            )

    async def lease_shared(self, client: str) -> Lease | SharedLease | None:
        """``lease`` from the shared table (the in-memory one when nothing is shared).

        Raises:
            TooManyStreams: the client holds its limit of streams on all front ends together.
            Overloaded: the shared store cannot be reached.
        """
        if self.shared is None:
            return self.lease(client)
        if self.max_streams is None:
            return None
        now = self._wall()
        lease = SharedLease(client, secrets.token_hex(8), now + self.lease_ttl_s)
        got = await self.shared.acquire(
            client, lease.id, self.max_streams, lease.expiry(now, self.shared_lease_ttl_s), now
        )
        if got.lapsed:
            self._metrics.lease_expiries.child().inc(got.lapsed)
        if not got.granted:
            self._too_many_streams.inc()
            raise TooManyStreams(
                f"this client already has {got.held} streams open on all front ends (limit {self.max_streams})"
            )
        self._shared_held.add(lease)
        return lease

    async def release_shared(self, lease: Lease | SharedLease | None) -> None:
        """Give back a lease of either kind; twice does nothing."""
        if not isinstance(lease, SharedLease):
            self.release(lease)
            return
        if lease.released or self.shared is None:
            return
        lease.released = True
        self._shared_held.discard(lease)
        await self.shared.release(lease.client, lease.id)

    async def renew_shared(self) -> None:
        """Push the expiry of this process's open shared leases ``shared_lease_ttl_s`` ahead (to their deadline)."""
        if self.shared is None:
            return
        now = self._wall()
        for lease in [held for held in self._shared_held if held.deadline <= now]:
            self._shared_held.discard(lease)  # past stream_lease_ttl_s: lapsed in the store too
        leases = [(held.client, held.id, held.expiry(now, self.shared_lease_ttl_s)) for held in self._shared_held]
        await self.shared.renew(leases, now)

    async def keep_shared_leases(self) -> None:
        """Renew shared leases three times per ``shared_lease_ttl_s`` until cancelled."""
        while True:
            await anyio.sleep(self.shared_lease_ttl_s / 3)
            await self.renew_shared()

    def gauges(self) -> dict[tuple[str, ...], float]:
        return {
            ("leases",): float((self.leases.total if self.leases else 0) + len(self._shared_held)),
            ("rate_buckets",): float(len(self.limiter) if self.limiter else 0),
        }
