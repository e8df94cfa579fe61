"""Shared state for plugins (``server.state``). Plugin authors may import this module.

A plugin gets its own :class:`Store` as the ``state`` argument of any hook but ``config_schema``
(declare it like ``settings``). A store is a key-value store with expiry, under a namespace
that is the plugin's name, so each plugin sees only its own keys::

    @hookimpl
    async def on_rcpt(session, state):
        seen = await state.incr(f"rcpt:{session.peer_ip}", ttl=60)
        if seen > 100:
            return Reply(452, "4.5.3", "Too many recipients this minute")

Values are strings (an ``int`` given to :meth:`Store.set` is stored as its decimal text).
``ttl`` is in seconds (a float is fine; at least a millisecond); ``None`` keeps a key until
deleted (or, in memory, evicted).

Backends: ``server.state = "memory"`` (the default) keeps the keys in each server process;
``"redis://[:password@]host:port/db"`` keeps them on Redis, shared by every worker of every node
that names it (needs the ``redis`` extra: ``pip install 'ingress-smtp[redis]'``). Every
operation takes at most ``server.state_timeout`` seconds; one that fails or takes longer raises
:class:`StateUnavailable`, which makes the hook fail closed (``451 4.3.0``). The outage is
logged once, and once more when Redis answers again; nothing else is logged per command.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib.util
import logging
import re
import sys
import time
from collections.abc import Callable

log = logging.getLogger("ingress.state")

__all__ = ["Backend", "MemoryBackend", "RedisBackend", "StateUnavailable", "Store",
           "check_url", "open_backend"]

# The in-process backend remembers at most this many keys (all plugins together); past it the
# oldest written key is forgotten. About 300 bytes a key: some 150 MB at the cap.
MEMORY_MAX_KEYS = 500_000

REDIS_CONNECTIONS = 32  # per server process

_URL = re.compile(r"redis://(?:(?P<auth>[^@/]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/@\[\]]+)"
                  r"(?::(?P<port>[0-9]{1,5}))?(?:/(?P<db>[0-9]*))?")


class StateUnavailable(Exception):
    """The state backend did not answer within ``server.state_timeout`` (or failed). Raised by
    :class:`Store` operations; the core answers the hook with ``451 4.3.0`` and logs the outage
    once. Plugins normally let it propagate."""


def check_url(value: str) -> str | None:
    """Why *value* is not a usable ``server.state`` (``None`` when it is)."""
    if value == "memory":
        return None
    match = _URL.fullmatch(value)
    if not match:
        return f"{value!r} is neither 'memory' nor a redis://[:password@]host:port/db URL"
    if match["port"] and not 0 < int(match["port"]) < 65536:
        return f"port {match['port']} is out of range"
    if importlib.util.find_spec("redis") is None:
        return "a redis:// state needs the redis package: pip install 'ingress-smtp[redis]'"
    return None


if sys.version_info >= (3, 11):
    async def _bounded(awaitable, seconds: float):
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    _bounded = asyncio.wait_for


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, round(ttl * 1000))


class Backend:
    """Where the keys live: one per server process, opened when the server starts (after the
    fork of ``server.workers``). Plugins use :class:`Store`, never a backend."""

    def __init__(self) -> None:
        self._stores: dict[str, Store] = {}

    def store(self, namespace: str) -> Store:
        """The :class:`Store` of one plugin (cached)."""
        store = self._stores.get(namespace)
        if store is None:
            store = self._stores[namespace] = Store(self, namespace)
        return store

    async def get(self, key: str) -> str | None:
        raise NotImplementedError

    async def set(self, key: str, value: str, ttl_ms: int | None, only_if_absent: bool) -> bool:
        raise NotImplementedError

    async def incr(self, key: str, amount: int, ttl_ms: int | None) -> int:
        raise NotImplementedError

    async def delete(self, key: str) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class Store:
    """One plugin's view of the state: every key is prefixed with its namespace."""

    def __init__(self, backend: Backend, namespace: str):
        self.backend = backend
        self.namespace = namespace
        self._prefix = f"ingress:{namespace}:"

    async def get(self, key: str) -> str | None:
        """The value of *key*, or ``None`` if it is absent or expired."""
        return await self.backend.get(self._prefix + key)

    async def set(self, key: str, value: str | int, *, ttl: float | None = None,
                  only_if_absent: bool = False) -> bool:
        """Store *value* under *key*, expiring after *ttl* seconds. With ``only_if_absent``
        nothing changes when the key exists. Returns whether the value was stored."""
        return await self.backend.set(self._prefix + key, str(value), _ms(ttl), only_if_absent)

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add *amount* (may be negative) to the integer at *key* (absent: 0), atomically, and
        return the new value. *ttl* applies when the key has no expiry yet (it was created by
        this call): a counter expires *ttl* seconds after its first increment. A key holding
        something other than an integer raises :class:`ValueError`."""
        return await self.backend.incr(self._prefix + key, amount, _ms(ttl))

    async def delete(self, key: str) -> bool:
        """Remove *key*; returns whether it existed."""
        return await self.backend.delete(self._prefix + key)


class MemoryBackend(Backend):
    """Keys in this process. Expired keys are dropped as writes go on (a heap of expiry
    times), and at most *max_keys* are kept: past that the oldest written key is forgotten."""

    def __init__(self, max_keys: int = MEMORY_MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.max_keys = max_keys
        self.clock = clock
        self._data: dict[str, tuple[str, float | None]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._evicting = False

    def __len__(self) -> int:
        return len(self._data)

    def _live(self, key: str) -> tuple[str, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.clock():
            del self._data[key]
            return None
        return entry

    def _purge(self) -> None:
        now = self.clock()
        heap = self._expiry
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is not None and entry[1] == when:
                del self._data[key]
        # Keys rewritten with a new expiry leave stale heap entries: rebuild when they pile up.
        if len(heap) > 2 * len(self._data) + 1024:
            self._expiry = [(e[1], k) for k, e in self._data.items() if e[1] is not None]
            heapq.heapify(self._expiry)

    def _put(self, key: str, value: str, ttl_ms: int | None) -> None:
        self._purge()
        expires = None if ttl_ms is None else self.clock() + ttl_ms / 1000
        self._data.pop(key, None)  # a rewritten key becomes the newest
        while len(self._data) >= self.max_keys:
            if not self._evicting:
                self._evicting = True
                log.warning("state: %d keys in memory; forgetting the oldest ones",
                            self.max_keys)
            del self._data[next(iter(self._data))]
        self._data[key] = (value, expires)
        if expires is not None:
            heapq.heappush(self._expiry, (expires, key))

    async def get(self, key: str) -> str | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: str, ttl_ms: int | None, only_if_absent: bool) -> bool:
        if only_if_absent and self._live(key) is not None:
            return False
        self._put(key, value, ttl_ms)
        return True

    async def incr(self, key: str, amount: int, ttl_ms: int | None) -> int:
        entry = self._live(key)
        if entry is None:
            self._put(key, str(amount), ttl_ms)
            return amount
        value, expires = entry
        try:
            new = int(value) + amount
        except ValueError:
            raise ValueError(f"state key {key!r} does not hold an integer") from None
        if expires is None and ttl_ms is not None:
            self._put(key, str(new), ttl_ms)
        else:
            self._data[key] = (str(new), expires)
        return new

    async def delete(self, key: str) -> bool:
        return self._live(key) is not None and self._data.pop(key) is not None


# INCRBY, and the expiry only on a key that has none: one round trip, atomic on the server.
_INCR = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""


class RedisBackend(Backend):
    """Keys on Redis, through the ``redis`` package's asyncio client (a connection pool).

    Every operation is bounded by *timeout*; a failure raises :class:`StateUnavailable` and
    marks Redis as down (logged once); the first success after that logs that it is back. The
    client reconnects by itself, so nothing has to be restarted."""

    def __init__(self, url: str, timeout: float):
        super().__init__()
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.timeout = timeout
        match = _URL.fullmatch(url)
        self.where = f"{match['host']}:{match['port'] or 6379}/{match['db'] or 0}"
        # A bounded pool: past REDIS_CONNECTIONS concurrent operations, the next ones wait for
        # a connection (within the timeout). One quick retry: a pooled connection that Redis
        # closed while it was away fails once before it is replaced.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=timeout, decode_responses=True,
            socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1))
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self._incr = self.client.register_script(_INCR)
        self._response_error = redis.ResponseError
        self.down = False

    async def _call(self, awaitable):
        try:
            result = await _bounded(awaitable, self.timeout)
        except self._response_error as exc:  # Redis answered: the plugin asked for nonsense
            raise ValueError(f"state: {exc}") from None
        except (Exception, asyncio.TimeoutError) as exc:
            if not self.down:
                self.down = True
                log.error("state: Redis %s unavailable (%s); hooks that use the state answer "
                          "451 4.3.0 until it is back", self.where,
                          type(exc).__name__ + (f": {exc}" if str(exc) else ""))
            raise StateUnavailable(f"Redis {self.where} unavailable") from None
        if self.down:
            self.down = False
            log.warning("state: Redis %s is back", self.where)
        return result

    async def get(self, key: str) -> str | None:
        return await self._call(self.client.get(key))

    async def set(self, key: str, value: str, ttl_ms: int | None, only_if_absent: bool) -> bool:
        return bool(await self._call(self.client.set(key, value, px=ttl_ms, nx=only_if_absent)))

    async def incr(self, key: str, amount: int, ttl_ms: int | None) -> int:
        ttl = "" if ttl_ms is None else str(ttl_ms)
        return int(await self._call(self._incr(keys=[key], args=[amount, ttl])))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self.client.delete(key)))

    async def close(self) -> None:
        try:
            await _bounded(self.client.aclose(close_connection_pool=True), self.timeout)
        except (Exception, asyncio.TimeoutError):
            pass


def open_backend(url: str = "memory", timeout: float = 1.0) -> Backend:
    """The backend for ``server.state`` *url* (validated by :func:`check_url`). Call it in the
    process and event loop that will use it: a Redis client is not shared across a fork."""
    if url == "memory":
        return MemoryBackend()
    return RedisBackend(url, timeout)
