"""A minimal DNS client: one A query over UDP with asyncio, and the wire codec it needs.

Only what a block-list lookup uses (RFC 1035): a query with one question, and the A records of
the answer. Replies that are not the answer to our question (wrong id, wrong question, not a
response) are ignored, so a stray or spoofed datagram cannot decide a lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import struct
from dataclasses import dataclass

TYPE_A = 1
CLASS_IN = 1
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_RD = 0x0100  # recursion desired
_QR = 0x8000  # this is a response


class DNSError(Exception):
    """A datagram that is not a well-formed answer to our query."""


@dataclass(frozen=True)
class Answer:
    rcode: int
    addresses: tuple[str, ...]  # the A records of the answer section


def reverse_name(ip: str) -> str:
    """The address as a block-list label sequence: ``192.0.2.1`` -> ``1.2.0.192``; IPv6 as 32
    nibbles, least significant first; an IPv4-mapped IPv6 address as its IPv4 address."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    suffix = ".in-addr.arpa" if address.version == 4 else ".ip6.arpa"
    return address.reverse_pointer.removesuffix(suffix)


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.strip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\0")


def build_query(name: str, qid: int) -> bytes:
    """A recursive query for the A records of *name*, with id *qid*."""
    return (_HEADER.pack(qid, _RD, 1, 0, 0, 0) + encode_name(name)
            + struct.pack("!HH", TYPE_A, CLASS_IN))


def _skip_name(data: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) name at *offset*."""
    while True:
        if offset >= len(data):
            raise DNSError("name runs past the end")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            return offset + 2
        if length & 0xC0:
            raise DNSError("bad label type")
        offset += 1 + length


def parse_response(data: bytes, query: bytes) -> Answer:
    """The answer in *data* to *query* (as built by :func:`build_query`)."""
    data = bytes(data)
    try:
        qid, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(data)
        question = query[_HEADER.size:]
        end = _HEADER.size + len(question)
        if (qid != _HEADER.unpack_from(query)[0] or not flags & _QR or qdcount != 1
                or data[_HEADER.size:end].lower() != question.lower()):
            raise DNSError("not the answer to our query")
        offset, addresses = end, []
        for _ in range(ancount):
            offset = _skip_name(data, offset)
            rtype, rclass, _ttl, length = _RR.unpack_from(data, offset)
            offset += _RR.size
            rdata = data[offset:offset + length]
            if len(rdata) != length:
                raise DNSError("record runs past the end")
            offset += length
            if rtype == TYPE_A and rclass == CLASS_IN and length == 4:
                addresses.append(str(ipaddress.IPv4Address(rdata)))
    except struct.error as exc:
        raise DNSError(f"truncated: {exc}") from None
    return Answer(flags & 0x000F, tuple(addresses))


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, query: bytes, done: asyncio.Future):
        self.query = query
        self.done = done

    def datagram_received(self, data: bytes, addr) -> None:
        if self.done.done():
            return
        try:
            answer = parse_response(data, self.query)
        except DNSError:
            return  # not ours: keep waiting for the real answer
        self.done.set_result(answer)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def query_a(name: str, server: tuple[str, int], timeout: float) -> Answer:
    """Ask *server* (host, port) for the A records of *name* over UDP.

    Raises :class:`TimeoutError` (``asyncio.TimeoutError`` on 3.10) when no answer comes within
    *timeout* seconds, :class:`OSError` when the server cannot be reached."""
    loop = asyncio.get_running_loop()
    query = build_query(name, secrets.randbits(16))
    done = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Exchange(query, done), remote_addr=server)
    try:
        transport.sendto(query)
        return await asyncio.wait_for(done, timeout)
    finally:
        transport.close()
