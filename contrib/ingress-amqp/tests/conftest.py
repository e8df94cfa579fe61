"""A real RabbitMQ node for the whole test session (Debian's rabbitmq-server), on free 127.0.0.1
ports, with everything of its own (data, logs, config, cookie, epmd) in a temporary folder;
stopped by PID at the end."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aio_pika
import aiormq
import pytest

SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RabbitMQ:
    """One broker node; :meth:`stop` and :meth:`start` again keep its data (same ports)."""

    def __init__(self, root: Path, name: str = "", epmd_port: int = 0, cookie: str = ""):
        """*name*, *epmd_port*, *cookie*: for nodes of one cluster (bench/fleet.py), which
        share an epmd the caller runs and a cookie; by default the node has its own."""
        self.root = root
        self.port = free_port()
        self.node = f"{name or f'ingress-test-{os.getpid()}'}@localhost"
        own_epmd = not epmd_port
        epmd_port = epmd_port or free_port()
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text("loopback_users = none\n")
        cookie_file = root / ".erlang.cookie"
        cookie_file.write_text(cookie or f"INGRESSTEST{os.getpid()}")
        cookie_file.chmod(0o400)
        self.env = dict(
            os.environ,
            HOME=str(root),
            ERL_EPMD_PORT=str(epmd_port),  # a private epmd: never the machine's port 4369
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            ERL_CRASH_DUMP=str(root / "erl_crash.dump"),
            RABBITMQ_MNESIA_BASE=str(root / "mnesia"),
            RABBITMQ_LOG_BASE=str(root / "log"),
            RABBITMQ_CONFIG_FILE=str(root / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(root / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(root / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        self.epmd = None
        if own_epmd:
            self.epmd = subprocess.Popen(["epmd", "-port", str(epmd_port)], env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.process: subprocess.Popen | None = None
        self.started = False  # once: the AMQP port is in the servers' configs from then on

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        """Start the node. A port picked free may be taken by someone else before the node
        binds it: then try again with other ports (the AMQP port stays once used)."""
        for attempt in range(3):
            self.env["RABBITMQ_DIST_PORT"] = str(free_port())
            try:
                return self._start()
            except RuntimeError as exc:
                if attempt == 2 or "already_used" not in str(exc) and "eaddrinuse" not in str(exc):
                    raise
                if not self.started:
                    self.port = free_port()
                    self.env["RABBITMQ_NODE_PORT"] = str(self.port)

    def _start(self) -> None:
        log = open(self.root / "server.out", "ab")  # noqa: SIM115 - the broker writes to it
        self.process = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while self.ctl("await_startup", "--timeout", "10").returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("rabbitmq-server did not start:\n"
                                   + (self.root / "server.out").read_text(errors="replace"))
            time.sleep(0.2)
        self.started = True

    def stop(self) -> None:
        """``rabbitmqctl stop``, then the server's processes by PID."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.ctl("stop", timeout=60)
        pidfile = self.root / "rabbitmq.pid"
        beam = int(pidfile.read_text()) if pidfile.is_file() else None
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if beam is not None:
            try:
                os.kill(beam, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def close(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait()

    # --- looking at the queue, as a consumer would ----------------------------------------------

    def run(self, coro):
        return asyncio.run(coro)

    def drain(self, queue: str = "ingress") -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Consume (and ack) every message now in *queue* (none if it does not exist)."""
        async def main():
            got = []
            async with await aio_pika.connect(self.url) as connection:
                channel = await connection.channel()
                try:
                    q = await channel.get_queue(queue, ensure=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return got
                while (message := await q.get(fail=False, no_ack=False)) is not None:
                    got.append(message)
                    await message.ack()
            return got
        return self.run(main())

    def delete_queue(self, queue: str) -> None:
        async def main():
            async with await aio_pika.connect(self.url) as connection:
                channel = await connection.channel()
                await channel.queue_delete(queue)
        self.run(main())

    def declare_classic(self, queue: str) -> None:
        async def main():
            async with await aio_pika.connect(self.url) as connection:
                channel = await connection.channel()
                await channel.declare_queue(queue, durable=True)
        self.run(main())

    def queue_type(self, queue: str) -> str:
        out = self.ctl("list_queues", "name", "type", "durable", "--quiet",
                       "--no-table-headers").stdout
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == queue:
                return " ".join(fields[1:])
        return ""


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    if not (SBIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        pytest.fail("rabbitmq-server (Debian package) is not installed")
    broker = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def running(rabbitmq):
    """The session's broker, running (a test before may have stopped it)."""
    if rabbitmq.process is None:
        rabbitmq.start()
    return rabbitmq
