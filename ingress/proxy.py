"""The PROXY protocol (versions 1 and 2) on connections from trusted proxies. Private to the core.

A proxy in ``server.proxy_protocol`` starts each connection with a header that names the real
client; :func:`read_header` reads it from the accepted socket before anything else happens on
that connection (before the TLS handshake of an implicit TLS listener), and reads not one byte
past it: what follows belongs to the SMTP or TLS layer.

aiosmtpd ships a parser (``aiosmtpd.proxy_protocol``), but it does not fit: it reads from an
asyncio stream, which on an implicit TLS listener exists only after the handshake; it bounds a
version 1 line only once the whole line has been read; and it logs every failure itself without
the proxy's address, where we want one line that names it. Only its v2 signature is used here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from aiosmtpd.proxy_protocol import V2_SIGNATURE

from ingress import ipnets

V1_SIGNATURE = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_FIXED = 16  # signature, version/command, family/protocol, length


class ProxyError(Exception):
    """The header is missing, malformed or too long; the message says which."""


async def read_header(sock: socket.socket, timeout: float) -> tuple[str, int] | None:
    """Read one PROXY header from the non-blocking *sock*, within *timeout* seconds.

    Returns the client's (address, port), or None when the header names no client (v1
    ``UNKNOWN``, v2 ``LOCAL`` or a non-IP family: the proxy speaks for itself). Raises
    :class:`ProxyError`."""
    buf = bytearray()
    try:
        return await _read(sock, buf, asyncio.get_running_loop().time() + timeout)
    except _Late:
        if buf:
            raise ProxyError(f"incomplete PROXY header after {timeout:g}s") from None
        raise ProxyError(f"no PROXY header within {timeout:g}s") from None


class _Late(Exception):
    pass


async def _readable(sock: socket.socket, deadline: float) -> None:
    """Wait until *sock* has data; raise _Late at *deadline*. (A timer, not asyncio.wait_for,
    which would cost a task per connection; a header already there costs no wait at all.)"""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake(exc: Exception | None = None) -> None:
        if not ready.done():
            ready.set_exception(exc) if exc else ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    timer = loop.call_at(deadline, wake, _Late())
    try:
        await ready
    finally:
        timer.cancel()
        loop.remove_reader(sock.fileno())


def _recv(sock: socket.socket, n: int, flags: int = 0) -> bytes | None:
    """Up to *n* bytes (b"" at the end of the stream), None if nothing is there yet."""
    try:
        return sock.recv(n, flags)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ProxyError(f"connection failed before the PROXY header ended: "
                         f"{exc.strerror or exc}") from None


async def _read(sock: socket.socket, buf: bytearray, deadline: float) -> tuple[str, int] | None:
    while True:
        if buf[:1] == V2_SIGNATURE[:1]:
            # v2: the fixed part says how long the rest is; read exactly that much.
            want = V2_FIXED if len(buf) < V2_FIXED else V2_FIXED + _v2_length(buf)
            data = _recv(sock, want - len(buf))
        else:
            # v1 (or not yet known): look ahead for the end of the line, take up to it.
            data = _recv(sock, V1_MAX - len(buf), socket.MSG_PEEK)
            if data:
                end = data.find(b"\n")
                data = _recv(sock, end + 1 if end >= 0 else len(data))
        if data is None:
            await _readable(sock, deadline)
            continue
        if not data:
            raise ProxyError("connection closed before the PROXY header ended" if buf
                             else "connection closed without a PROXY header")
        buf += data
        if buf[:1] == V2_SIGNATURE[:1]:
            if not V2_SIGNATURE.startswith(buf[:12]):
                raise ProxyError("not a PROXY protocol header")
            if len(buf) >= V2_FIXED and len(buf) == V2_FIXED + _v2_length(buf):
                return _parse_v2(bytes(buf))
        else:
            if not V1_SIGNATURE.startswith(buf[:6]):
                raise ProxyError("not a PROXY protocol header")
            if buf.endswith(b"\n"):
                return _parse_v1(bytes(buf))
            if len(buf) >= V1_MAX:
                raise ProxyError(f"PROXY v1 header longer than {V1_MAX} bytes")


def _v2_length(buf: bytearray) -> int:
    if buf[12] >> 4 != 2:
        raise ProxyError(f"PROXY v2 header with version {buf[12] >> 4}")
    return struct.unpack_from("!H", buf, 14)[0]


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535 or (
            len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"PROXY v1 header with bad port {text[:8]!r}")
    return int(text)


def _parse_v1(line: bytes) -> tuple[str, int] | None:
    if not line.endswith(b"\r\n"):
        raise ProxyError("PROXY v1 header not ended by CRLF")
    try:
        fields = line[len(V1_SIGNATURE):-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 header with non-ASCII bytes") from None
    if fields[0] == "UNKNOWN":
        return None
    kind = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}.get(fields[0])
    if kind is None:
        raise ProxyError(f"PROXY v1 header with unknown protocol {fields[0][:8]!r}")
    if len(fields) != 5:
        raise ProxyError("PROXY v1 header with a wrong number of fields")
    try:
        source, _ = kind(fields[1]), kind(fields[2])
    except ValueError:
        raise ProxyError(f"PROXY v1 header with bad {fields[0]} addresses") from None
    port, _ = _port(fields[3]), _port(fields[4])
    return _client(source, port)


def _parse_v2(header: bytes) -> tuple[str, int] | None:
    command, family = header[12] & 0x0F, header[13]
    if command == 0:  # LOCAL: health checks and the like
        return None
    if command != 1:
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    body = header[V2_FIXED:]
    if family in (0x11, 0x12):  # IPv4 over TCP or UDP
        size, kind = 12, ipaddress.IPv4Address
    elif family in (0x21, 0x22):  # IPv6
        size, kind = 36, ipaddress.IPv6Address
    elif family >> 4 in (0, 3):  # UNSPEC, UNIX: no IP client to name
        return None
    else:
        raise ProxyError(f"PROXY v2 header with unknown family 0x{family:02x}")
    if len(body) < size:
        raise ProxyError("PROXY v2 header too short for its addresses")
    half = (size - 4) // 2
    port = struct.unpack_from("!H", body, size - 4)[0]
    return _client(kind(body[:half]), port)


def _client(source: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> tuple[str, int]:
    """The session's peer: an IPv4-mapped source (a dual-stack proxy) as plain IPv4."""
    return str(ipnets.client_ip(str(source))), port
