"""ingress plugin ``greylist``: refuse the first attempt of an unknown triplet for a while.

A triplet is (client network, MAIL FROM, RCPT): the client's IPv4 /24 or IPv6 /64 (an
IPv4-mapped address counts as IPv4), the sender lower-cased (``<>`` as empty) and the recipient
lower-cased. At RCPT a triplet that has not passed gets ``451 4.7.1 Greylisted, please try again
later``; a retry at least ``delay_seconds`` after its first attempt passes, and from then on the
triplet passes at once for ``pass_seconds``. A retry that comes too early is refused without
restarting the clock; a triplet not passed within ``expire_seconds`` of its first attempt is
forgotten.

The plugin runs after the builtin checks, so relay denials and unknown mailboxes get their own
answers and are never greylisted. Its triplets live in the server's shared state
(``server.state``): with Redis, a retry that reaches another node or worker passes the same way.
Keys are digests of the triplets, so no address is stored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from importlib import resources

from ingress import Reply, hookimpl, ipnets

__all__ = ["Greylist", "network", "plugin", "triplet"]

log = logging.getLogger("ingress_greylist")

GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")


def network(peer_ip: str) -> str:
    """The client network of a triplet: IPv4 /24, IPv6 /64, IPv4-mapped IPv6 as IPv4."""
    ip = ipnets.client_ip(peer_ip)
    if ip is None:
        return peer_ip
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def triplet(peer_ip: str, mail_from: str, rcpt: str) -> tuple[str, str, str]:
    """(client network, sender lower-cased, recipient lower-cased); ``<>`` is ``""``."""
    return network(peer_ip), mail_from.lower(), rcpt.lower()


def _key(parts: tuple[str, str, str]) -> str:
    return hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"),
                           digest_size=16).hexdigest()


def _whitelisted(peer_ip: str, whitelist: list[str]) -> bool:
    return ipnets.matches(peer_ip, whitelist)


class Greylist:
    """The plugin. The installed entry point is the module's :data:`plugin` instance; tests may
    make their own with another ``clock`` (wall-clock seconds: nodes compare each other's)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock

    @hookimpl
    def config_schema(self):
        return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))

    @hookimpl
    def check_settings(self, settings):
        # A triplet is forgotten expire_seconds after its first attempt; a retry passes only
        # delay_seconds after it: with expire <= delay no triplet could ever pass.
        if settings["expire_seconds"] <= settings["delay_seconds"]:
            return [("/expire_seconds",
                     f"{settings['expire_seconds']:g} is not more than delay_seconds "
                     f"({settings['delay_seconds']:g}): no retry could ever pass")]
        return None

    @hookimpl
    async def on_rcpt(self, session, transaction, recipient, settings, state):
        if session.auth_user and not settings["authenticated"]:
            return None
        if _whitelisted(session.peer_ip, settings["whitelist"]):
            return None
        parts = triplet(session.peer_ip, transaction.mail_from, recipient.address)
        key = _key(parts)
        if await state.get(f"pass:{key}") is not None:
            return None
        now = self.clock()
        first = None
        if not await state.set(f"first:{key}", repr(now), ttl=settings["expire_seconds"],
                               only_if_absent=True):
            first = await state.get(f"first:{key}")
            if first is None:  # expired between the two calls: a first attempt again
                await state.set(f"first:{key}", repr(now), ttl=settings["expire_seconds"])
        if first is not None:
            waited = now - float(first)
            if waited >= settings["delay_seconds"]:
                await state.set(f"pass:{key}", "1", ttl=settings["pass_seconds"])
                await state.delete(f"first:{key}")
                log.info("greylist: %s <%s> -> <%s> passes after %.0fs", *parts, waited)
                return None
            why = f"retry after {waited:.0f}s, before {settings['delay_seconds']:g}s"
        else:
            why = "first attempt"
        log.info("greylist: greylisted %s <%s> -> <%s> (%s), session %s", *parts, why,
                 session.id)
        return GREYLISTED


#: The instance the ``ingress.plugins`` entry point names.
plugin = Greylist()
