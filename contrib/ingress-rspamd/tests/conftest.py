"""A real rspamd (Debian's package, /usr/bin/rspamd) for the whole test session, with the
package's own rules but everything else of its own in a temporary folder: config overrides,
databases, pid file, log, and a normal worker on a free 127.0.0.1 port. Its DNS resolver is a
UDP port of 127.0.0.1 where nothing answers, so no rule ever reaches the network. Stopped by
PID at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

RSPAMD = os.environ.get("RSPAMD", "/usr/bin/rspamd")
CONFDIR = Path("/etc/rspamd")
START_TIMEOUT = 120

# Our rspamd.conf: the package's rules (common.conf), then only what this instance needs.
CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = {workers};
    .include "$CONFDIR/worker-normal.inc"
}}
"""
OPTIONS = """\
dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.1s; retransmits = 0; }}
control_socket = "$DBDIR/rspamd.sock mode=0600";
"""
# The package's rspamd.lua runs $LOCAL_CONFDIR/rspamd.local.lua: a rule that lets a test ask
# for any action with an "X-Test-Action:" header, so every action is rspamd's real answer.
TEST_RULE = """\
rspamd_config:register_symbol({
  name = 'INGRESS_TEST_ACTION',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local action = task:get_header('X-Test-Action')
    if action then
      task:set_pre_result(action, 'asked for by the test', 'ingress_test')
    end
  end,
})
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rspamd:
    """One rspamd; :meth:`stop` and :meth:`start` again keep its port and databases."""

    def __init__(self, root: Path, workers: int = 1):
        self.root = root
        self.port = free_port()
        (root / "local.d").mkdir()
        for sub in ("db", "run"):
            (root / sub).mkdir()
        (root / "rspamd.conf").write_text(CONFIG.format(port=self.port, workers=workers))
        (root / "local.d" / "options.inc").write_text(
            OPTIONS.format(dns_port=free_port(socket.SOCK_DGRAM)))
        (root / "rspamd.local.lua").write_text(TEST_RULE)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [RSPAMD, "-f", "-c", str(self.root / "rspamd.conf")]
        if os.geteuid() == 0:  # rspamd refuses root unless told, and then wants a user
            command += ["-i", "-u", "root", "-g", "root"]
        for name, path in (("CONFDIR", CONFDIR), ("LOCAL_CONFDIR", self.root),
                           ("DBDIR", self.root / "db"), ("RUNDIR", self.root / "run"),
                           ("LOGDIR", self.root)):
            command += ["--var", f"{name}={path}"]
        return command

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as answer:
                return answer.read().strip() == b"pong"
        except OSError:
            return False

    def start(self) -> None:
        with open(self.root / "rspamd.out", "ab") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("rspamd did not start:\n" + self.output())
            time.sleep(0.1)

    def output(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-5000:]
                         for path in (self.root / "rspamd.out", self.root / "rspamd.log")
                         if path.is_file())

    def stop(self) -> None:
        """SIGTERM to the main process (it stops its workers), SIGKILL to the group if it
        lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # workers left behind by a main process that died
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory):
    if shutil.which(RSPAMD) is None or not (CONFDIR / "common.conf").is_file():
        pytest.fail("rspamd (Debian package) is not installed")
    daemon = Rspamd(tmp_path_factory.mktemp("rspamd"))
    started = time.monotonic()
    try:
        daemon.start()
        daemon.startup_seconds = time.monotonic() - started
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def running(rspamd):
    """The session's rspamd, running (a test before may have stopped it)."""
    if rspamd.process is None:
        rspamd.start()
    return rspamd
