"""max_connections: refuse connections over the limit with 421 at the greeting: 4.3.2 over the
server's limit, 4.7.0 over the limit per client address."""

from __future__ import annotations

import ipaddress

import ingress_schemas
from ingress import Reply, hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("max_connections")


def address_key(ip: str) -> str:
    """What ``per_ip`` counts: an IPv4 address, an IPv6 /64 (IPv4-mapped IPv6 counts as its
    IPv4 address); anything that is not an IP address as it is."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])  # without an IPv6 zone
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@hookimpl
def on_connect(session, settings):
    limit = settings["limit"]
    # session.connections is the core's exact count of served connections, this one included.
    if limit and session.connections > limit:
        return Reply(421, "4.3.2", f"{session.hostname} Too many connections", close=True)
    per_ip = settings["per_ip"]
    if per_ip and session.count_concurrent(
            "max_connections.per_ip " + address_key(session.peer_ip)) > per_ip:
        return Reply(421, "4.7.0", f"{session.hostname} Too many connections from your address",
                     close=True)
    return None
