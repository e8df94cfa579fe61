"""ingress plugin ``dnsbl``: refuse clients listed by DNS block lists.

The client's address, reversed (``192.0.2.1`` -> ``1.2.0.192``; IPv6 as nibbles), is looked up
as ``<reversed>.<zone>`` A records in every configured zone at once, through the configured
resolver. An answer in 127.0.0.0/8 lists the client: it gets ``554 5.7.1 <ip> listed by <zone>``.
Everything else lets it in: no such name, and also every failure (timeout, SERVFAIL, an
unreachable resolver, answers outside 127.0.0.0/8 or in 127.255.255.0/24, which block lists use
to report errors), each logged as a warning. A block list being down must not stop mail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from importlib import resources

from ingress import Reply, hookimpl, ipnets
from ingress.config import parse_host_port

from ingress_dnsbl.dns import NOERROR, NXDOMAIN, query_a, reverse_name

log = logging.getLogger("ingress_dnsbl")

NAME = "dnsbl"
LISTED = ipaddress.ip_network("127.0.0.0/8")
ERRORS = ipaddress.ip_network("127.255.255.0/24")
RCODES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}


@hookimpl
def config_schema():
    return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))


@hookimpl
async def on_connect(session, settings):
    if settings["check_at"] != "connect":
        return None
    found = await listed_by(session.peer_ip, settings)
    if found is None:
        return None
    return Reply(554, "5.7.1", f"{found[0]} listed by {found[1]}", close=True)


@hookimpl
async def on_rcpt(session, settings):
    if settings["check_at"] != "rcpt":
        return None
    notes = session.notes.setdefault(NAME, {})
    if "found" not in notes:  # one lookup per connection, however many recipients
        notes["found"] = await listed_by(session.peer_ip, settings)
    if notes["found"] is None:
        return None
    return Reply(554, "5.7.1", "{} listed by {}".format(*notes["found"]))


def client_address(peer_ip: str) -> str | None:
    """The address to look up (IPv4-mapped IPv6 as IPv4), or None if *peer_ip* is none."""
    address = ipnets.client_ip(peer_ip)
    return None if address is None else str(address)


async def listed_by(peer_ip: str, settings: dict) -> tuple[str, str] | None:
    """``(address, zone)`` of the first zone (in config order) that lists *peer_ip*, or None."""
    address = client_address(peer_ip)
    zones = [zone.rstrip(".") for zone in settings["zones"]]
    if address is None or not zones:
        return None
    if ipnets.matches(address, settings["allow"]):
        return None
    name = reverse_name(address)
    results = await asyncio.gather(*(
        _lookup(address, f"{name}.{zone}", zone, settings) for zone in zones))
    for zone, listed in zip(zones, results, strict=True):
        if listed:
            log.info("dnsbl: %s listed by %s", address, zone)
            return address, zone
    return None


async def _lookup(address: str, qname: str, zone: str, settings: dict) -> bool:
    resolver, timeout = settings["resolver"], settings["timeout_seconds"]

    def fail_open(why: str) -> bool:
        log.warning("dnsbl: %s lookup of %s failed (%s); letting the client in", zone, address,
                    why)
        return False

    try:
        answer = await query_a(qname, parse_host_port(resolver), timeout)
    except asyncio.TimeoutError:
        return fail_open(f"no answer from {resolver} within {timeout:g}s")
    except OSError as exc:
        return fail_open(f"resolver {resolver}: {exc.strerror or exc}")
    if answer.rcode == NXDOMAIN:
        return False
    if answer.rcode != NOERROR:
        return fail_open(RCODES.get(answer.rcode, f"rcode {answer.rcode}"))
    addresses = [ipaddress.IPv4Address(a) for a in answer.addresses]
    if any(a in LISTED and a not in ERRORS for a in addresses):
        return True
    if addresses:
        return fail_open("answer " + ", ".join(map(str, addresses)) + " is not a listing")
    return False
