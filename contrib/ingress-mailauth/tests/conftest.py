"""A DNS server of the tests' own on 127.0.0.1 (dnslib) and keys made for each test session.

The server answers from a table the test fills: SPF and DMARC TXT records, DKIM keys. A silent
UDP port stands for a resolver that never answers."""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnslib import MX, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):
    """TXT, A and MX records by name; everything else does not exist. Records every question."""

    def __init__(self, ttl: int = 0):
        self.txt: dict[str, list[str]] = {}
        self.a: dict[str, list[str]] = {}
        self.mx: dict[str, list[str]] = {}
        self.questions: list[tuple[str, str]] = []
        self.ttl = ttl
        self._lock = threading.Lock()

    def resolve(self, request, handler):
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.questions.append((name, qtype))
        reply = request.reply()
        if qtype == "TXT" and name in self.txt:
            for record in self.txt[name]:
                data = record.encode()
                strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
                reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(strings), ttl=self.ttl))
        elif qtype == "A" and name in self.a:
            for address in self.a[name]:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=self.ttl))
        elif qtype == "MX" and name in self.mx:
            for preference, exchange in enumerate(self.mx[name]):
                reply.add_answer(RR(name, QTYPE.MX, rdata=MX(exchange, preference),
                                    ttl=self.ttl))
        elif not any(name in table for table in (self.txt, self.a, self.mx)):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def serve(zone: Zone):
    """Start a dnslib server for *zone* on a free UDP port of 127.0.0.1; returns (server,
    thread, "127.0.0.1:port")."""
    server = DNSServer(zone, address="127.0.0.1", port=0,
                       logger=DNSLogger(prefix=False, logf=lambda _: None))
    # Not server.start_thread(): a shorter poll makes stopping quick.
    thread = threading.Thread(target=server.server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    return server, thread, f"127.0.0.1:{server.server.server_address[1]}"


def stop(server, thread) -> None:
    server.stop()
    server.server.server_close()
    thread.join(10)


@pytest.fixture
def zone():
    """An empty zone served on 127.0.0.1; ``.nameserver`` is its ``ip:port``."""
    table = Zone()
    server, thread, table.nameserver = serve(table)
    yield table
    stop(server, thread)


@pytest.fixture
def silent_nameserver():
    """A UDP port of 127.0.0.1 that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Key:
    """A signing key for dkimpy and its DNS record (``v=DKIM1; k=...; p=...``)."""

    private: bytes
    record: str
    algorithm: bytes


def rsa_key(bits: int = 1024) -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}",
               b"rsa-sha256")


def ed25519_key() -> Key:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return Key(base64.b64encode(seed), f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}",
               b"ed25519-sha256")


@pytest.fixture(scope="session")
def keys() -> dict[str, Key]:
    """Fresh keys for the session: two RSA (one published, one "wrong"), one ed25519."""
    return {"rsa": rsa_key(), "other": rsa_key(), "ed25519": ed25519_key()}
