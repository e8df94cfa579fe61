"""Prometheus metrics: a core plugin (``metrics``) that counts, and a small HTTP endpoint.

Private to the core; plugins that want their own metrics create them in
:data:`REGISTRY` with ``prometheus_client``. Counting happens in hooks like any plugin:
``connection_opened`` and ``on_disconnect`` (sessions, open connections: every connection,
refused ones included), ``on_reply`` (rejections by the plugin that gave them),
``after_delivery`` (messages, bytes, per local domain). The per-domain series are kept unless a
plugin answers no to ``per_domain_statistics`` (the relay plugin does for an open relay), asked
once per config generation in ``config_loaded``.

With ``server.workers > 1`` prometheus_client runs in multiprocess mode (each worker writes its
values to files in a private folder, ``PROMETHEUS_MULTIPROC_DIR``, set before prometheus_client
is first imported; see :mod:`ingress.workers`) and one worker serves the sum of all of them.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ingress import hookimpl
from ingress.config import parse_host_port

log = logging.getLogger("ingress.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
SESSIONS = Counter("ingress_sessions", "SMTP sessions (connections), refused ones included",
                   registry=REGISTRY)
OPEN = Gauge("ingress_open_connections", "Open SMTP connections", registry=REGISTRY,
             multiprocess_mode="livesum")
MESSAGES = Counter("ingress_messages_accepted", "Messages stored and acknowledged with 250",
                   registry=REGISTRY)
BYTES = Counter("ingress_bytes_accepted", "Bytes of accepted messages", registry=REGISTRY)
REJECTIONS = Counter("ingress_rejections", "Replies with a 4xx/5xx code, by plugin and code",
                     ["plugin", "code"], registry=REGISTRY)
DOMAIN_MESSAGES = Counter("ingress_domain_messages", "Accepted messages per local recipient domain",
                          ["domain"], registry=REGISTRY)


# The answer of the latest config generation in this process; statistics need no finer grain.
_per_domain = True


@hookimpl
async def config_loaded(config):
    global _per_domain
    allowed, _ = await config.hooks.call("per_domain_statistics", config=config)
    _per_domain = allowed is not False


@hookimpl
def connection_opened(session):
    SESSIONS.inc()
    OPEN.inc()


@hookimpl
def on_disconnect(session):
    OPEN.dec()


@hookimpl
def on_reply(reply, plugin):
    if reply.code >= 400:
        REJECTIONS.labels(plugin, str(reply.code)).inc()


@hookimpl
def after_delivery(session, transaction, message):
    MESSAGES.inc()
    BYTES.inc(message.size)
    if _per_domain:
        directory = session.directory
        for domain in {directory.split(r.address)[1] for r in transaction.recipients if r.local}:
            DOMAIN_MESSAGES.labels(domain).inc()


def all_workers_registry() -> CollectorRegistry:
    """A registry that collects the metrics of every worker process (multiprocess mode)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def _serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      registry: CollectorRegistry) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
        if path.split(b"?")[0] == b"/metrics":
            body, status, ctype = generate_latest(registry), b"200 OK", CONTENT_TYPE_LATEST
        else:
            body, status, ctype = b"not found; try /metrics\n", b"404 Not Found", "text/plain"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        pass
    finally:
        writer.close()


async def start_http(listen: str, all_workers: bool = False) -> tuple[asyncio.AbstractServer, str]:
    """Serve /metrics on *listen*: this process's metrics, or with *all_workers* those of every
    worker (on a port the parent holds with SO_REUSEPORT)."""
    registry = all_workers_registry() if all_workers else REGISTRY
    host, port = parse_host_port(listen, listen=True)
    server = await asyncio.start_server(
        lambda r, w: _serve_http(r, w, registry), host, port,
        reuse_port=all_workers or None)
    addr = server.sockets[0].getsockname()
    shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return server, f"{shown}:{addr[1]}"
