"""ingress plugin ``ratelimit``: per-client-IP limits on connections and messages.

Each limit counts events in a sliding window: a client may open ``max_connections`` connections
and give ``max_messages`` MAIL FROM commands within any ``window_seconds``. Only what the limit let
through is counted, so a refused client gets in again as soon as its oldest counted event is a
window old. State is in memory, per server process, and bounded: clients idle for a whole window
are forgotten, and at most ``max_clients`` are remembered.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from importlib import resources

from ingress import Reply, hookimpl

__all__ = ["RateLimit", "SlidingWindow", "client_key", "plugin"]

log = logging.getLogger("ingress_ratelimit")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SlidingWindow:
    """Per-key sliding-window logs: the times of the last events counted for each key.

    Keys are kept in the order of their newest event, so the ones idle for a whole window are
    at the front and are dropped as time goes on; each key holds at most ``limit`` times.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def hit(self, key: str, limit: int, window: float, max_keys: int) -> bool:
        """Count one event for *key* and return True, or return False (and count nothing) when
        *key* already has *limit* events in the last *window* seconds."""
        now = self.clock()
        horizon = now - window
        self._expire(horizon)
        events = self._events.get(key)
        if events is None:
            events = self._events[key] = deque()
        while events and events[0] <= horizon:
            events.popleft()
        if len(events) >= limit:
            return False
        events.append(now)
        self._events.move_to_end(key)
        while len(self._events) > max_keys:
            self._events.popitem(last=False)
        return True

    def _expire(self, horizon: float) -> None:
        while self._events:
            key, events = next(iter(self._events.items()))
            if events and events[-1] > horizon:
                return
            del self._events[key]


@functools.lru_cache(maxsize=32)
def _networks(allow: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    networks = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            log.error("ratelimit: ignoring allow entry %r: not an IP address or network", entry)
    return tuple(networks)


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
    if not allow:
        return False
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _networks(tuple(allow)) if net.version == ip.version)


class RateLimit:
    """The plugin. The installed entry point is the module's :data:`plugin` instance; tests may
    make their own with a fake ``clock``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.connections = SlidingWindow(clock)
        self.messages = SlidingWindow(clock)

    @hookimpl
    def config_schema(self):
        return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))

    def _refused(self, window: SlidingWindow, limit: int, session, settings) -> bool:
        if limit == 0 or _allowed(session.peer_ip, settings["allow"]):
            return False
        key = client_key(session.peer_ip, settings["ipv6_prefix"])
        return not window.hit(key, limit, settings["window_seconds"], settings["max_clients"])

    @hookimpl
    def on_connect(self, session, settings):
        if self._refused(self.connections, settings["max_connections"], session, settings):
            log.info("ratelimit: refusing connection from %s: over %d connections in %gs",
                     session.peer_ip, settings["max_connections"], settings["window_seconds"])
            return Reply(421, "4.7.0", f"{session.hostname} Too many connections from "
                         f"{session.peer_ip}, try again later", close=True)
        return None

    @hookimpl
    def on_mail_from(self, session, settings):
        if self._refused(self.messages, settings["max_messages"], session, settings):
            log.info("ratelimit: refusing MAIL from %s: over %d messages in %gs",
                     session.peer_ip, settings["max_messages"], settings["window_seconds"])
            return Reply(450, "4.7.1", f"Too many messages from {session.peer_ip}, "
                         "try again later")
        return None


#: The instance the ``ingress.plugins`` entry point names; it keeps its counts across reloads.
plugin = RateLimit()
