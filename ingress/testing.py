"""Test kits for plugin authors: unit tests of one hook, and real servers. Plugin authors may
import this module.

Installed as a pytest plugin (``pytest11`` entry point ``ingress``); nothing here is autouse.

``ingress_plugin`` (a :class:`PluginHarness`) calls one hook of one plugin, with no server and no
sockets, in a millisecond or so: the plugin's settings are validated by its own schema and
defaulted as a config file's would be, and the session, transaction, recipient and message it
gets are the core's own classes::

    def test_refuses_localhost(ingress_plugin):
        plugin = ingress_plugin(hello_policy, {"refuse": ["localhost"]})
        assert plugin.call("on_helo", verb="EHLO", hostname="localhost").code == 550

``ingress_server`` starts ``python -m ingress serve`` as a subprocess from a config dict, on a free
port of 127.0.0.1, with its Maildir and queue in the test's ``tmp_path``::

    def test_greeting(ingress_server):
        server = ingress_server({"plugins": {"banner": {"text": "hi"}}})
        with server.smtp() as client:
            assert client.ehlo()[0] == 250

The server process imports what the test process can import: the directories pytest (or
``sys.path``) added for the tests are passed on through ``PYTHONPATH``, so a plugin module that sits
beside its tests can be named in ``server.plugin_modules``.

Shared state (``server.state``): ``ingress_redis`` starts a real ``redis-server`` of the test's
own (a free port of 127.0.0.1, a temporary folder, nothing saved) and gives a
:class:`RedisServer`; put its ``url`` in ``server.state``. It can stop, start (on the same port)
and pause the server, to test what a plugin does while Redis is away::

    def test_limit_is_shared(ingress_server, ingress_redis):
        config = {"server": {"state": ingress_redis.url}, "plugins": {"myplugin": {}}}
        a, b = ingress_server(config, name="a"), ingress_server(config, name="b")

``ingress_state`` is a fresh in-process :class:`ingress.state.Store`, for calling one hook of
a plugin directly in a unit test (``await on_rcpt(session, ..., state=ingress_state)``).

``ingress_inprocess_server`` runs the server on an event loop in a thread of the test process, and
also takes plugin objects that are not installed anywhere (``plugins={"name": obj}``); such an
object replaces an installed plugin of the same name for that server, so a plugin's own tests can
hand it a fake clock or resolver. Its log records go through :mod:`logging` (use ``caplog``).

``SMTPRaw`` is a byte-level client for rude and slow clients; :class:`HAProxy` runs a real HAProxy
in front of a server; ``small_filesystem`` mounts a small file system for disk-full tests.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import json
import os
import re
import shutil
import signal
import site
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ingress import addresses

if TYPE_CHECKING:
    from ingress.session import Recipient, Session, Transaction
    from ingress.spool import Message

READY = re.compile(r"ingress: listening on (\S+):(\d+) \((smtps?|metrics)\)")
START_TIMEOUT = 20.0


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def server_config(tmp_path: Path, config: dict | None = None) -> dict:
    """*config* completed with what a test server needs: free ports on 127.0.0.1, hostname
    ``mx.test``, Maildir and queue under *tmp_path*, and a short drain."""
    base = {
        "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"], "drain_seconds": 2},
        "delivery": {"maildir": str(tmp_path / "mail"), "queue": str(tmp_path / "queue")},
    }
    return deep_merge(base, config or {})


def eventually(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll *predicate* until it is true; fail the test after *timeout* seconds. For effects a
    server produces on its own time (a log line after SIGHUP, a connection count going down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class HAProxy:
    """A real HAProxy (``/usr/sbin/haproxy``, TCP mode) on a free port of 127.0.0.1 in front of
    *backends* (``(host, port)``), with *server_options* on each server line (``send-proxy``,
    ``send-proxy-v2``, ``""`` for plain TCP proxying, ``check``...) and *backend_lines* (e.g.
    ``option smtpchk``). Started in the foreground by :meth:`start`, stopped by its PID::

        with HAProxy(tmp_path, [(server.host, server.port)], "send-proxy-v2") as proxy:
            with proxy.raw(source="127.0.0.2") as client:
                assert "127.0.0.2" in client.reply()[1]  # a banner with #ConnectedIP#
    """

    BINARY = "/usr/sbin/haproxy"

    def __init__(self, workdir: Path, backends: list[tuple[str, int]], server_options: str = "",
                 backend_lines: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        servers = [f"    server n{i} {h}:{p} {server_options}" for i, (h, p) in
                   enumerate(backends)]
        self.config_text = "\n".join([
            "global", "    maxconn 4096",
            "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 60s",
            "    timeout server 60s",
            "frontend smtp", f"    bind {self.host}:{self.port}", "    default_backend nodes",
            "backend nodes", "    balance roundrobin", *(f"    {x}" for x in backend_lines),
            *servers, ""])
        self.process: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        """Start it; in a test without HAProxy installed: skip (fail when ``CI`` is set)."""
        if not os.path.exists(self.BINARY):
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{self.BINARY} is missing")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([self.BINARY, "-db", "-f", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.process.returncode}):\n"
                                   + self.log_path.read_text(errors="replace"))
            if self._listening():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("haproxy did not start listening")
            time.sleep(0.05)

    def _listening(self) -> bool:
        # Probing by binding, not connecting: a probe connection would reach the backends.
        with socket.socket() as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError:
                return True
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def raw(self, source: str = "127.0.0.1") -> SMTPRaw:
        """A byte-level client connected to HAProxy from the local address *source* (any
        127.x.y.z), so that the server behind can tell it from HAProxy's own address."""
        return SMTPRaw(self.host, self.port, source=source)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of *host* that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RunningServer:
    """A started server: where it listens and where it stores mail."""

    def __init__(self, config: dict, config_path: Path, listeners: list[tuple[str, int, str]]):
        self.config = config
        self.config_path = config_path
        self.listeners = listeners
        self.maildir = Path(config["delivery"]["maildir"])
        self.queue = Path(config["delivery"]["queue"])
        self.hostname = config["server"]["hostname"]

    @property
    def host(self) -> str:
        return self.listeners[0][0]

    @property
    def port(self) -> int:
        return next(p for _, p, kind in self.listeners if kind == "smtp")

    @property
    def tls_port(self) -> int:
        return next(p for _, p, kind in self.listeners if kind == "smtps")

    @property
    def metrics_url(self) -> str:
        host, port = next((h, p) for h, p, kind in self.listeners if kind == "metrics")
        return f"http://{host}:{port}/metrics"

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        """An ``smtplib.SMTP`` client connected to the first plain listener."""
        kwargs.setdefault("timeout", 10)
        return smtplib.SMTP(self.host, self.port, **kwargs)

    def raw(self, port: int | None = None, source: str | None = None) -> SMTPRaw:
        """An :class:`SMTPRaw` connected to the first plain listener (or *port*), from the
        local address *source* if given (say ``127.0.0.2``, another client address)."""
        return SMTPRaw(self.host, port or self.port, source=source)

    def mailbox(self, address: str, folder: str | None = None) -> list[bytes]:
        """The messages in the Maildir ``new/`` of *address* (of its *folder*, say
        ``"Quarantine"``, when given), oldest first. The folder is found as the server names
        it: the A-label domain, the local part in NFC lower case."""
        local, domain = addresses.split(address)
        box = self.maildir / domain / addresses.local_key(local)
        new = (box / f".{folder}" if folder else box) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def all_messages(self) -> list[Path]:
        """Every message file in every mailbox's ``new/``."""
        return sorted(self.maildir.glob("*/*/new/*"))

    def queue_entries(self) -> list[tuple[dict, bytes]]:
        """``(envelope, message bytes)`` of every complete queue entry."""
        entries = []
        for meta in sorted(self.queue.glob("*.json")):
            entries.append((json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes()))
        return entries


class SubprocessServer(RunningServer):
    def __init__(self, config, config_path, listeners, process, log_path):
        super().__init__(config, config_path, listeners)
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait for the exit code (killed after *timeout* seconds)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stdout_reader.join(5)
        self.process.stdout.close()
        return self.process.returncode


def _import_path() -> list[str]:
    """The entries of ``sys.path`` that a fresh interpreter would not have: the directories
    pytest or a conftest put there for the tests (not the standard library nor site-packages)."""
    system = [Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    try:
        system += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # pragma: no cover - old virtualenv's site module
        pass
    system.append(Path(site.getusersitepackages()))
    found: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd())
        if not path.is_dir() or any(path == s or s in path.parents for s in system):
            continue
        if str(path) not in found:
            found.append(str(path))
    return found


def start_subprocess(
    config: dict, workdir: Path, *, env: dict | None = None, disabled: tuple[str, ...] = (),
    args: tuple[str, ...] = (), log_format: str = "text",
) -> SubprocessServer:
    """Write *config* as JSON in *workdir* and run ``python -m ingress serve`` on it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "ingress.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = workdir / "ingress.log"
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    pythonpath = [*_import_path(), *filter(None, full_env.get("PYTHONPATH", "").split(os.pathsep))]
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    if disabled:
        full_env["INGRESS_DISABLE_PLUGINS"] = ",".join(disabled)
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it exits
    process = subprocess.Popen(
        [sys.executable, "-m", "ingress", "--log-format", log_format, "serve", "--config",
         str(config_path), *args],
        stdout=subprocess.PIPE, stderr=log_file, cwd=workdir, env=full_env,
    )
    log_file.close()
    server = config["server"]
    wanted = len(server.get("listen", ["x"])) + len(server.get("listen_tls", []))
    wanted += 1 if server.get("metrics_listen") else 0
    listeners: list[tuple[str, int, str]] = []
    deadline = time.monotonic() + START_TIMEOUT
    while len(listeners) < wanted:
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            process.wait(5)
            process.stdout.close()
            raise RuntimeError(f"ingress exited ({process.returncode}) before it was ready:\n"
                               + log_path.read_text(errors="replace"))
        found = READY.search(line)
        if found:
            listeners.append((found[1].strip("[]"), int(found[2]), found[3]))
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            process.stdout.close()
            raise RuntimeError("ingress did not get ready in time")
    reader = threading.Thread(target=process.stdout.read, daemon=True)
    reader.start()
    server = SubprocessServer(config, config_path, listeners, process, log_path)
    server._stdout_reader = reader
    return server


class InProcessServer(RunningServer):
    """A server on an event loop in a background thread of the test process."""

    def __init__(self, config, config_path, cfg, plugins):
        from ingress.server import Server

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def boot():
            server = Server(cfg)
            return server, await server.start()

        try:
            self.server, ready = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(30)
        except BaseException:
            self._close_loop()
            raise
        listeners = []
        for line in ready:
            found = READY.search(f"ingress: listening on {line}")
            listeners.append((found[1].strip("[]"), int(found[2]), found[3]))
        super().__init__(config, config_path, listeners)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if not self._loop.is_running():
            return
        self.call(self.server.drain(0))
        self.call(self.server.state.close())
        self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextmanager
def _shadowing_entry_points(names):
    """Hide installed plugins named *names* while a config is built: the objects given to the
    in-process server take their place."""
    from ingress import manager

    original = manager.entry_point_infos
    manager.entry_point_infos = lambda: {
        name: info for name, info in original().items() if name not in names
    }
    try:
        yield
    finally:
        manager.entry_point_infos = original


def start_inprocess(config: dict, workdir: Path, plugins: dict[str, object] | None = None):
    from ingress import config as config_mod

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "ingress.json"
    config_path.write_text(json.dumps(config, indent=1))
    with _shadowing_entry_points(set(plugins or ())):
        cfg = config_mod.build(config, config_path, workdir, extra_plugins=plugins or {})
    return InProcessServer(config, config_path, cfg, plugins)


@pytest.fixture
def ingress_server(tmp_path):
    """Factory: ``ingress_server(config=None, *, env=None, disabled=(), args=(),
    log_format="text")`` starts a subprocess server (``args``: more options for ``ingress serve``,
    e.g. ``--no-uvloop``; ``log_format="json"`` for JSON log lines) and returns a
    :class:`SubprocessServer`; every server is stopped after the test."""
    started: list[SubprocessServer] = []

    def start(config: dict | None = None, *, env: dict | None = None,
              disabled: tuple[str, ...] = (), name: str = "server",
              args: tuple[str, ...] = (), log_format: str = "text") -> SubprocessServer:
        full = server_config(tmp_path / name, config)
        server = start_subprocess(full, tmp_path / name, env=env, disabled=disabled, args=args,
                                  log_format=log_format)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def ingress_inprocess_server(tmp_path):
    """Factory: ``ingress_inprocess_server(config=None, plugins={name: obj})`` runs a server in
    this process (plugin objects need not be installed); stopped after the test."""
    started: list[InProcessServer] = []

    def start(config: dict | None = None, plugins: dict[str, object] | None = None,
              name: str = "server") -> InProcessServer:
        full = server_config(tmp_path / name, config)
        server = start_inprocess(full, tmp_path / name, plugins)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def small_filesystem():
    """Factory: ``small_filesystem(path, kib)`` mounts a RAM file system of *kib* KiB on *path*
    (made if missing) for disk-full tests, and unmounts it after the test. Needs root (the test
    is skipped without). Request it before the server fixture, so the server stops first."""
    mounted: list[Path] = []

    def mount(path: Path, kib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


class SMTPRaw:
    """A byte-level SMTP client for tests of rude, slow and malformed clients."""

    def __init__(self, host: str, port: int, timeout: float = 10, source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self._buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: ``(code, text)``, lines joined by ``\\n``."""
        lines = []
        while True:
            line = self._line().decode(errors="replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None = None):
        """Send STARTTLS; on ``220`` wrap the socket in TLS. Returns the reply."""
        reply = self.cmd("STARTTLS")
        if reply[0] == 220:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return reply

    def closed_by_server(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection (EOF), within *timeout*."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SMTPRaw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RedisServer:
    """A ``redis-server`` of one test: 127.0.0.1 only, its own folder, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        if binary is None:
            message = "redis-server is not installed (Debian: apt-get install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(f"{message}, and CI must run this test")
            pytest.skip(message)
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        with open(self.workdir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start:\n"
                                   + (self.workdir / "redis.log").read_text(errors="replace"))
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM, killed after 10 s) and wait for the exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused one must see the SIGTERM
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: it keeps its port and accepts connections but answers nothing (a network
        cut, as a client sees it)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def ingress_redis(tmp_path):
    """A running :class:`RedisServer` of this test (``.url`` for ``server.state``); stopped
    after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ingress_state():
    """A fresh in-process :class:`ingress.state.Store` (namespace ``test``) for unit tests of
    hooks that take ``state``."""
    from ingress.state import MemoryBackend

    return MemoryBackend().store("test")


# --- unit tests of one hook: no server ------------------------------------------------------------

# The config a harness starts from (like server_config): completed by the core schema's defaults.
HARNESS_CONFIG = {"server": {"hostname": "mx.test"}, "directory": {"domains": ["example.test"]}}


def _plugin_name(plugin: object) -> str:
    name = getattr(plugin, "NAME", None)
    if name:
        return name
    if inspect.ismodule(plugin):
        return plugin.__name__.rsplit(".", 1)[-1]
    raise ValueError("give the plugin's name: PluginHarness(plugin, settings, name=...)")


class PluginHarness:
    """One plugin (a module or an object, as registered in a server), its settings, and the core's
    own :class:`~ingress.session.Session`, :class:`~ingress.session.Transaction`,
    :class:`~ingress.session.Recipient` and :class:`~ingress.spool.Message` to call its hooks
    with. No server, no event loop unless a hook needs one.

    :param settings: the plugin's ``[plugins.<name>]`` section. It is validated with the plugin's
        own ``config_schema``, defaulted and checked by its ``check_settings`` exactly as a
        config file's section is (:class:`ingress.errors.ConfigError` on a bad one);
        :attr:`settings` is the result. Relative paths are checked against the current folder.
    :param name: the plugin's name; default: its ``NAME`` attribute, or a module's own name.
    :param config: the rest of the config (``server``, ``directory``...), merged over
        ``HARNESS_CONFIG`` (hostname ``mx.test``, local domain ``example.test``) and validated
        by the core schema: sessions see ``hostname`` and ``directory`` as in a server.
    :param spool_dir: where a message over 1 MiB spills; default: a temporary folder.
    """

    def __init__(self, plugin: object, settings: dict | None = None, *, name: str | None = None,
                 config: dict | None = None, spool_dir: Path | None = None):
        from ingress import config as config_mod
        from ingress import manager
        from ingress.directory import Directory, DirectoryError
        from ingress.dispatch import Hooks
        from ingress.errors import ConfigError

        self.plugin = plugin
        self.name = name or _plugin_name(plugin)
        pm = manager.new_manager()
        info = manager.PluginInfo(self.name, "test", plugin)
        manager.register(pm, info)
        own = dict(Hooks(pm, {}, set()).call_sync("config_schema")).get(self.name)
        schema = config_mod.merged_schema({self.name: own})
        raw = deep_merge(HARNESS_CONFIG, copy.deepcopy(config or {}))
        raw["plugins"] = {self.name: copy.deepcopy(settings if settings is not None else {})}
        source = f"{self.name} (test config)"
        problems = config_mod.schema_errors(schema, raw)
        if problems:
            raise ConfigError([f"{source}: {p}: {m}" for p, m in problems])
        config_mod.apply_defaults(schema, raw)
        try:
            directory = Directory.from_config(raw["directory"], Path.cwd())
        except DirectoryError as exc:
            raise ConfigError([f"{source}: {p}: {m}" for p, m in exc.errors]) from None
        self.hooks = Hooks(pm, raw["plugins"], set(), timeout=raw["server"]["hook_timeout"])
        problems, _ = config_mod.settings_problems(self.hooks, Path.cwd())
        if problems:
            raise ConfigError([f"{source}: {p}: {m}" for p, m in problems])
        self.config = config_mod.Config(None, raw, directory, (info,), self.hooks, schema)
        self.settings: dict = raw["plugins"][self.name]
        #: what ``session.count_concurrent(key)`` counts: preset a key to play other connections
        self.concurrent: collections.Counter[str] = collections.Counter()
        from ingress.state import open_backend

        #: the plugin's ``state``: an in-process store, fresh for each harness
        self.state_backend = open_backend("memory", raw["server"]["state_timeout"])
        self._spool_dir = spool_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._messages: list[Message] = []

    # --- the objects hooks receive ----------------------------------------------------------

    def session(self, *, peer: tuple[str, int] = ("192.0.2.1", 50000),
                local: tuple[str, int] = ("127.0.0.1", 25), tls: bool = False,
                connections: int = 1, helo: str | None = None, esmtp: bool | None = None,
                auth_user: str | None = None) -> Session:
        """A new session of a client at *peer*; after HELO/EHLO when *helo* is given (``esmtp``
        then defaults to true), authenticated as *auth_user* when given."""
        from ingress.session import Session

        session = Session(self.config, peer, local, tls=tls, connections=connections)
        session._count_concurrent = self._count_concurrent
        session.state_backend = self.state_backend
        if helo is not None:
            session.helo, session.esmtp = helo, True if esmtp is None else esmtp
        session.auth_user = auth_user
        return session

    def _count_concurrent(self, key: str) -> int:
        self.concurrent[key] += 1
        return self.concurrent[key]

    def transaction(self, mail_from: str = "sender@example.org",
                    params: dict[str, str | None] | None = None, recipients: tuple = (),
                    session: Session | None = None) -> Transaction:
        """A transaction as after ``MAIL FROM:<mail_from>`` (*params*: upper-case keys), with
        *recipients* (addresses or :meth:`recipient` objects) already accepted; it becomes
        *session*'s transaction when a session is given."""
        from ingress.session import Transaction

        transaction = Transaction(mail_from, dict(params or {}))
        transaction.recipients.extend(
            self.recipient(r) if isinstance(r, str) else r for r in recipients)
        if session is not None:
            session.transaction = transaction
        return transaction

    def recipient(self, address: str, params: dict[str, str | None] | None = None) -> Recipient:
        """A recipient as after ``RCPT TO:<address>``; ``local`` as the directory says."""
        from ingress.session import Recipient

        local = self.config.directory.is_local_address(address)
        return Recipient(address, dict(params or {}), local)

    def message(self, data: bytes | str, *, data_limit: int | None = None) -> Message:
        """A message as received after DATA: *data* (``str`` is UTF-8) with bare CR or LF made
        CRLF and a final CRLF, as the core stores it; past *data_limit* it is ``oversized``."""
        from ingress.spool import Message
        from ingress.syntax import BARE_CR_OR_LF

        raw = data.encode() if isinstance(data, str) else bytes(data)
        raw = BARE_CR_OR_LF.sub(b"\r\n", raw)
        if raw and not raw.endswith(b"\r\n"):
            raw += b"\r\n"
        if self._spool_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ingress-harness-")
            self._spool_dir = Path(self._tmp.name)
        message = Message(self._spool_dir, data_limit)
        message.write(raw)
        self._messages.append(message)
        return message

    # --- calling one hook -------------------------------------------------------------------

    def _start(self, hook: str, kwargs: dict[str, Any]) -> tuple[Any, bool]:
        from ingress import hookspecs

        spec = getattr(hookspecs, hook, None)
        if not hasattr(spec, "ingress_spec"):
            raise ValueError(f"no hook named {hook!r}")
        impls = self.hooks.impls(hook)
        if not impls:
            raise ValueError(f"plugin {self.name!r} does not implement {hook}")
        arguments = [n for n in inspect.signature(spec).parameters
                     if n not in ("settings", "state")]
        unknown = sorted(set(kwargs) - set(arguments))
        if unknown:
            raise TypeError(f"{hook} takes {', '.join(arguments)}, not {', '.join(unknown)}")
        if "session" in arguments and "session" not in kwargs:
            kwargs["session"] = self.session()
        [impl] = impls
        missing = [n for n in impl.argnames if n not in ("settings", "state") and n not in kwargs]
        if missing:
            raise TypeError(f"{self.name}'s {hook} needs {', '.join(missing)}")
        # The core's own way of calling an implementation (ingress.dispatch).
        result = self.hooks._start(hook, impl, kwargs)
        return result, self.hooks._pending(impl, result)

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call the plugin's *hook* with these arguments (by name, as the spec names them; a
        missing ``session`` is a new :meth:`session`, ``settings`` is :attr:`settings`) and
        return what it returned. An ``async def`` hook or an awaitable result is run to its end
        on an event loop of its own, bounded by ``server.hook_timeout``; inside a running event
        loop use :meth:`acall`. Unlike in a server, an exception propagates (a server would fail
        closed with ``451 4.3.0``), and no other plugin runs."""
        result, pending = self._start(hook, kwargs)
        if not pending:
            return result
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._wait(result))
        if inspect.iscoroutine(result):
            result.close()
        raise RuntimeError(f"{hook} must be awaited here: use 'await harness.acall(...)'")

    async def acall(self, hook: str, **kwargs: Any) -> Any:
        """:meth:`call` for a test that runs an event loop itself: awaits the result."""
        result, pending = self._start(hook, kwargs)
        return await self._wait(result) if pending else result

    async def _wait(self, awaitable: Any) -> Any:
        from ingress.dispatch import _bounded

        return await _bounded(awaitable, self.hooks.timeout)

    def close(self) -> None:
        """Remove what the messages spilled to disk."""
        for message in self._messages:
            message.close()
        self._messages.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PluginHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def ingress_plugin(tmp_path):
    """Factory: ``ingress_plugin(plugin, settings=None, *, name=None, config=None)`` returns a
    :class:`PluginHarness` for unit tests of one hook (no server); closed after the test."""
    made: list[PluginHarness] = []

    def make(plugin: object, settings: dict | None = None, *, name: str | None = None,
             config: dict | None = None) -> PluginHarness:
        harness = PluginHarness(plugin, settings, name=name, config=config,
                                spool_dir=tmp_path / "spool")
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
