"""Listeners, connection accounting, reload and drain. Private to the core."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingress import config as config_mod
from ingress import ipnets, leftovers, metrics, proxy
from ingress.errors import ConfigError, IngressError
from ingress.keycounts import KeyCounts
from ingress.reply import Reply
from ingress.smtp import SMTPProtocol
from ingress.state import open_backend

log = logging.getLogger("ingress.server")


def parse_listen(value: str) -> tuple[str, int]:
    """``(host, port)`` of a listen address the config already checked."""
    return config_mod.parse_host_port(value, listen=True)


def tls_context(cfg: config_mod.Config) -> ssl.SSLContext | None:
    server = cfg.server
    if not server["tls_cert"]:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server["tls_cert"], server["tls_key"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cfg.source}: /server/tls_cert: cannot load certificate/key: "
                          f"{exc}") from None
    return context


def raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every connection is a file descriptor,
    and the common soft default (1024) is below the default max_connections."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard) or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
        return
    log.info("open file limit raised from %d to %d", soft, hard)


def spool_dir(cfg: config_mod.Config) -> Path:
    return Path(cfg.data["delivery"]["queue"]) / "spool"


def prepare_spool(cfg: config_mod.Config) -> None:
    """Once, before serving (by the parent when there are workers): crash leftovers go."""
    leftovers.remove_at_start(spool_dir(cfg), Path(cfg.data["delivery"]["queue"]))


ACCEPT_BATCH = 64  # connections taken per readiness event: one busy listener cannot hog the loop
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of file descriptors or memory
HANDSHAKE_SECONDS = 60  # implicit TLS: a client must finish its handshake within this


def bind_socket(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Sockets bound to *host*:*port* (every address of *host*; all interfaces when empty),
    not yet listening."""
    sockets = []
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # an address family this host lacks (IPv6 switched off, say)
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"no address family of {host or '*'} can be used here")
    return sockets


class Listener:
    """A listening socket whose connections the server accepts itself.

    The peer address comes from ``accept()``. uvloop would ask ``getpeername()`` later, which
    fails once the client has reset: a client that sends its whole session in one write and
    resets would be served without an IP (no IP checks, no IP in logs and Received)."""

    def __init__(self, server: Server, sock: socket.socket, tls: bool):
        self.server = server
        self.sock = sock
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        sock.listen(1024)
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # gone while it waited in the backlog
                continue
            except OSError as exc:  # out of file descriptors or memory, mostly
                log.error("cannot accept connections: %s; trying again in %gs",
                          exc.strerror or exc, ACCEPT_PAUSE)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.loop.create_task(self._start(conn, peer))

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _start(self, conn: socket.socket, peer: tuple) -> None:
        server = self.server
        try:
            local = conn.getsockname()
        except OSError:
            local = self.sock.getsockname()
        settings = server.config.server
        if ipnets.matches(peer[0], settings["proxy_protocol"]):
            try:
                peer = await proxy.read_header(conn, settings["proxy_timeout"]) or peer
            except proxy.ProxyError as exc:
                log.warning("connection from proxy %s closed: %s", peer[0], exc)
                conn.close()
                return
        try:
            await self.loop.connect_accepted_socket(
                lambda: SMTPProtocol(server, tls_listener=self.tls, peer=peer, local=local),
                conn, ssl=server.tls_context if self.tls else None,
                ssl_handshake_timeout=HANDSHAKE_SECONDS if self.tls else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:  # e.g. a failed handshake
            log.debug("connection from %s not started: %s", peer[0], exc)
            conn.close()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


@dataclass
class Worker:
    """What a worker process (``server.workers > 1``) gets from its parent: the listen
    addresses with their ports resolved, its slot in the shared table of open connections,
    and whether it serves the metrics of all workers."""

    slot: int
    listen: list[str]
    listen_tls: list[str]
    metrics_listen: str  # "" except in the worker that serves /metrics
    open_connections: Any  # a shared array of per-worker counts (multiprocessing.RawArray)
    parent_fd: int  # read end of a pipe the parent never writes to: EOF means it is gone
    key_table: Any = None  # shared open connections per key, a region per worker (keycounts)


class Server:
    def __init__(self, cfg: config_mod.Config, worker: Worker | None = None):
        self.config = cfg
        self.worker = worker
        self._spool_dir: tuple[config_mod.Config, Path] | None = None
        self.tls_context = tls_context(cfg)
        self.own_connections = 0  # open connections of this process, exact
        self.key_counts = KeyCounts() if worker is None or worker.key_table is None else (
            KeyCounts(worker.key_table, worker.slot, len(worker.open_connections)))
        self.protocols: set[SMTPProtocol] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.messages_accepted = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Opened here, in the process and loop that serve (after a worker's fork).
        self.state = open_backend(cfg.server["state"], cfg.server["state_timeout"])
        self.sweeper: asyncio.Task | None = None
        # Every plugin object that had its startup in this process, by identity: its name and
        # the latest generation that used it (shutdown gets those settings).
        self.started: dict[int, tuple[str, config_mod.Config]] = {}
        self._generations = asyncio.Lock()  # start and reloads switch generations one at a time
        self._reload: asyncio.Task | None = None
        if worker is None:  # workers share the spool; their parent prepares it once
            prepare_spool(cfg)

    @property
    def connections(self) -> int:
        """Open connections of the whole server: across all worker processes, if any.
        (Counts of two workers accepting at the same instant may each miss the other's.)"""
        if self.worker is None:
            return self.own_connections
        return sum(self.worker.open_connections)

    # --- accounting, called by the protocol ----------------------------------------------------

    def connection_opened(self, protocol: SMTPProtocol) -> None:
        self.own_connections += 1
        if self.worker is not None:
            self.worker.open_connections[self.worker.slot] = self.own_connections
        self.protocols.add(protocol)
        self._idle.clear()

    def connection_closed(self, protocol: SMTPProtocol) -> None:
        self.own_connections -= 1
        if self.worker is not None:
            self.worker.open_connections[self.worker.slot] = self.own_connections

    def session_ended(self, protocol: SMTPProtocol) -> None:
        self.protocols.discard(protocol)
        if not self.protocols:
            self._idle.set()

    def message_accepted(self, session, transaction, message) -> None:
        self.messages_accepted += 1

    def spool_dir(self, cfg: config_mod.Config) -> Path:
        # Asked per message, mostly of the same config generation: made once per generation.
        cached = self._spool_dir
        if cached is None or cached[0] is not cfg:
            cached = self._spool_dir = (cfg, spool_dir(cfg))
        return cached[1]

    # --- listeners -----------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Open every listener; return the ready lines (``host:port (smtp|smtps)``)."""
        server = self.config.server
        worker = self.worker
        reuse_port = worker is not None
        listen = worker.listen if worker else server["listen"]
        listen_tls = worker.listen_tls if worker else server["listen_tls"]
        metrics_listen = worker.metrics_listen if worker else server["metrics_listen"]
        async with self._generations:
            await self.config.hooks.run_all("startup", config=self.config)
            self._note_started(self.config)
            await self.config.hooks.run_all("config_loaded", config=self.config)
        ready = []
        for value, tls in [(v, False) for v in listen] + [(v, True) for v in listen_tls]:
            host, port = parse_listen(value)
            try:
                sockets = bind_socket(host, port, reuse_port)
            except OSError as exc:
                await self.close_listeners()
                raise IngressError(f"cannot listen on {value}: {exc.strerror or exc}") from None
            for sock in sockets:
                self.listeners.append(Listener(self, sock, tls))
                addr = sock.getsockname()
                shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                ready.append(f"{shown}:{addr[1]} ({'smtps' if tls else 'smtp'})")
        if metrics_listen:
            try:
                http, where = await metrics.start_http(metrics_listen, all_workers=reuse_port)
            except OSError as exc:
                await self.close_listeners()
                raise IngressError(f"cannot listen on {metrics_listen} (metrics): "
                                   f"{exc.strerror or exc}") from None
            self.listeners.append(http)
            ready.append(f"{where} (metrics)")
        if worker is None or worker.slot == 0:  # one sweeper per server
            self.sweeper = asyncio.create_task(leftovers.sweep_maildir(self))
        return ready

    async def close_listeners(self) -> None:
        # Not wait_closed(): from Python 3.12 on it also waits for every open connection.
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    # --- reload and drain ------------------------------------------------------------------------

    def _note_started(self, cfg: config_mod.Config) -> None:
        for info in cfg.plugins:
            self.started[id(info.plugin)] = (info.name, cfg)

    def _new_plugins(self, cfg: config_mod.Config) -> set[str]:
        """Plugins of *cfg* whose object has not had its startup in this process."""
        return {info.name for info in cfg.plugins if id(info.plugin) not in self.started}

    def reload(self) -> None:
        """SIGHUP: switch to the config file's current content (in a task: plugins may wait)."""
        self._reload = asyncio.ensure_future(self.switch_config())

    async def switch_config(self) -> bool:
        """Load the config file again; new sessions use it, open ones keep theirs. Plugins it
        activates get ``startup`` (one that refuses refuses the reload), then every plugin gets
        ``config_loaded``."""
        async with self._generations:
            path = self.config.path
            try:
                cfg = config_mod.load(path)
                context = tls_context(cfg)
                new = self._new_plugins(cfg)
                if new:
                    await cfg.hooks.run_all("startup", only=new, config=cfg)
            except IngressError as exc:
                for line in exc.lines:
                    log.error("reload refused, keeping the old config: %s", line)
                return False
            if cfg.server["listen"] != self.config.server["listen"] or (
                cfg.server["listen_tls"] != self.config.server["listen_tls"]
            ):
                log.warning("reload: listener changes take effect at the next restart")
            if (cfg.server["state"], cfg.server["state_timeout"]) != (
                    self.config.server["state"], self.config.server["state_timeout"]):
                log.warning("reload: state changes take effect at the next restart")
            self._note_started(cfg)
            await cfg.hooks.collect("config_loaded", config=cfg)  # failures are logged
            self.config, self.tls_context = cfg, context
            if self.worker is None or self.worker.slot == 0:  # once per server
                for line in cfg.warnings:
                    log.warning("%s", line)
            log.info("reloaded %s", cfg.source)
            return True

    async def drain(self, seconds: float) -> None:
        """Stop accepting; let open sessions finish for *seconds*; then cut them with 421."""
        await self.close_listeners()
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.protocols:
            log.info("draining %d session(s) for up to %gs", len(self.protocols), seconds)
            try:
                await asyncio.wait_for(self._idle.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        for protocol in list(self.protocols):
            hostname = protocol.config.hostname
            protocol.abort(Reply(421, "4.3.2", f"{hostname} Service shutting down", close=True))
        if self.protocols:
            try:
                await asyncio.wait_for(self._idle.wait(), 5)
            except asyncio.TimeoutError:
                log.warning("%d session(s) did not end", len(self.protocols))
        await self._shutdown_plugins()

    async def _shutdown_plugins(self) -> None:
        """``shutdown`` once per started plugin object, with the latest settings it had:
        the current generation's plugins, then those a reload deactivated."""
        async with self._generations:
            current = self.config
            await current.hooks.collect("shutdown")
            for name, cfg in self.started.values():
                if cfg is not current:
                    await cfg.hooks.collect("shutdown", only={name})


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


async def run(cfg: config_mod.Config, ready=print_lines, worker: Worker | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; SIGHUP reloads. A worker also stops when its
    parent is gone. *ready* gets the list of ready lines."""
    raise_open_file_limit()
    server = Server(cfg, worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: a signal sent as soon as the ready line is read must not kill us.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if worker is not None:
        loop.add_reader(worker.parent_fd, stop.set)
        # The parent forks with these blocked; what arrived meanwhile is handled from now on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        ready([f"ingress: listening on {line}" for line in await server.start()])
        await stop.wait()
        log.info("shutting down")
        await server.drain(server.config.server["drain_seconds"])
    finally:
        await server.state.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if worker is not None:
            loop.remove_reader(worker.parent_fd)
    return 0
