"""Matching client addresses against lists of IPs and CIDR networks (relay whitelist, trusted
proxies). Plugins may import :func:`matches` and :func:`parse_network`."""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(value: str) -> IPAddress | None:
    """*value* as an address, an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a
    dual-stack socket shows for an IPv4 client) as IPv4, a zone (``%eth0``) dropped; None if
    it is not an address."""
    try:
        ip = ipaddress.ip_address(value.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_network(entry: str) -> IPNetwork | None:
    """An IP (``192.0.2.7``) or CIDR network (``10.0.0.0/8``; host bits allowed: 10.1.2.3/8 is
    10/8), or None if *entry* is neither. No zones, no surrounding blanks."""
    if not isinstance(entry, str) or "%" in entry or entry != entry.strip():
        return None
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """The valid entries parsed, once per distinct list (config validation reports the rest)."""
    return tuple(net for net in map(parse_network, entries) if net is not None)


def matches(address: str, entries: list[str] | tuple[str, ...]) -> bool:
    """Whether the address *address* is in one of the IPs/networks *entries*."""
    if not entries:
        return False
    ip = client_ip(address)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks(tuple(entries)))
