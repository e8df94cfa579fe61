"""ingress plugin ``ratelimit``: per-client-IP limits on connections and messages.

A client may open ``max_connections`` connections and give ``max_messages`` MAIL FROM commands
within ``window_seconds``. Each limit counts in fixed windows of ``window_seconds`` and weighs
the previous window's count by how much of it still lies within the last ``window_seconds`` (a
sliding window, approximated with two counters). Only what the limit let through is counted.

The counts live in the server's shared state (``server.state``): per server process with the
default ``memory``, and shared by every worker of every node that names the same Redis with a
``redis://`` state, so the limits then hold across workers and nodes. Each count expires two
windows after it was started; the in-process state is bounded (see ``ingress.state``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from importlib import resources

from ingress import Reply, hookimpl, ipnets

__all__ = ["RateLimit", "client_key", "hit", "plugin"]

log = logging.getLogger("ingress_ratelimit")


async def hit(state, key: str, limit: int, window: float, now: float) -> bool:
    """Count one event for *key* in *state* and return True, or return False (and count
    nothing) when *key* already has *limit* events in the window ending at *now*."""
    index = math.floor(now / window)
    overlap = 1.0 - (now / window - index)  # the part of the previous window still inside
    previous = await state.get(f"{key}:{index - 1}")
    carried = int(previous) * overlap if previous else 0.0
    if carried + 1 > limit + 1e-9:
        return False
    count = await state.incr(f"{key}:{index}", ttl=2 * window)
    if carried + count > limit + 1e-9:
        await state.incr(f"{key}:{index}", -1)  # refusals are not counted
        return False
    return True


def client_key(peer_ip: str, ipv6_prefix: int) -> str:
    """What a client is counted as: its IPv4 address, or its IPv6 network of *ipv6_prefix*."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def _allowed(peer_ip: str, allow: list[str]) -> bool:
    return ipnets.matches(peer_ip, allow)


class RateLimit:
    """The plugin. The installed entry point is the module's :data:`plugin` instance; tests may
    make their own with another ``clock`` (wall-clock seconds: nodes share the windows)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock

    @hookimpl
    def config_schema(self):
        return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))

    async def _refused(self, kind: str, limit: int, session, settings, state) -> bool:
        if limit == 0 or _allowed(session.peer_ip, settings["allow"]):
            return False
        key = f"{kind}:{client_key(session.peer_ip, settings['ipv6_prefix'])}"
        return not await hit(state, key, limit, settings["window_seconds"], self.clock())

    @hookimpl
    async def on_connect(self, session, settings, state):
        if await self._refused("conn", settings["max_connections"], session, settings, state):
            log.info("ratelimit: refusing connection from %s: over %d connections in %gs",
                     session.peer_ip, settings["max_connections"], settings["window_seconds"])
            return Reply(421, "4.7.0", f"{session.hostname} Too many connections from "
                         f"{session.peer_ip}, try again later", close=True)
        return None

    @hookimpl
    async def on_mail_from(self, session, settings, state):
        if await self._refused("mail", settings["max_messages"], session, settings, state):
            log.info("ratelimit: refusing MAIL from %s: over %d messages in %gs",
                     session.peer_ip, settings["max_messages"], settings["window_seconds"])
            return Reply(450, "4.7.1", f"Too many messages from {session.peer_ip}, "
                         "try again later")
        return None


#: The instance the ``ingress.plugins`` entry point names.
plugin = RateLimit()
