"""``server.workers = N``: N processes sharing the listeners through SO_REUSEPORT. Private.

The parent loads and validates the config, empties the spool and reserves every listener: a
socket bound with SO_REUSEPORT that never listens fixes a port given as 0 and turns a port taken
by someone else into an error before anything starts. Then it forks the workers. Each runs the
ordinary server (:func:`ingress.server.run`) with its own listening sockets on those ports; the
kernel spreads new connections over them. The parent only supervises:

- it prints the ready lines once, when every worker listens;
- SIGHUP is forwarded to every worker, each reloads (the parent reloads too, for the workers it
  may start later); SIGTERM/SIGINT are forwarded, and the parent exits 0 once every worker has
  drained and exited 0;
- a worker that dies is started again; the parent gives up after repeated failures at start.
  A worker whose parent is gone drains and exits.

Limits stay global: each worker writes its number of open connections into its slot of a shared
array, and ``Server.connections`` is the sum; likewise its connections per key
(``session.count_concurrent``) into its region of a shared table (:mod:`ingress.keycounts`).
Metrics: prometheus_client multiprocess mode (its files in shared memory where there is some),
with worker 0 serving ``/metrics`` for all.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from ingress import config as config_mod
from ingress import files
from ingress.errors import IngressError
from ingress.keycounts import clear_region, shared_table

log = logging.getLogger("ingress.workers")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
RAM_FOLDER = "/dev/shm"  # tmpfs on Linux
RAM_FOLDER_FREE = 16 << 20  # bytes free there, else the metric files go to the temporary folder
METRICS_PREFIX = "ingress-metrics-"
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start counts as a failed start
FAILED_STARTS = 5  # consecutive failed starts after which the parent gives up
KILL_GRACE = 30.0  # seconds past drain_seconds before the parent kills a worker still running


def wanted(path: str | None) -> int:
    """``server.workers`` as written in the config file, read before the real load (which has
    to come after :func:`use_multiprocess_metrics`). Anything odd counts as 1; the real load
    reports it."""
    if path is None:
        return 1
    try:
        raw = files.read_file(Path(path))
    except IngressError:
        return 1
    server = raw.get("server") if isinstance(raw, dict) else None
    value = server.get("workers", 1) if isinstance(server, dict) else 1
    return value if type(value) is int and value > 1 else 1


def metrics_parent_folder() -> str | None:
    """Where the workers' metric files go: the shared-memory folder when there is one we may
    write to with room to spare, else the temporary folder (None). Each count writes into a
    file mapped in memory; on a disk, every ``syncfs`` of the delivery (often the same file
    system) would write those pages back and make them read-only again, so the next count pays
    a page fault. (A write to a mapped file on a full tmpfs kills the process: hence the room.)"""
    try:
        free = os.statvfs(RAM_FOLDER)
    except OSError:
        return None
    if free.f_bavail * free.f_frsize >= RAM_FOLDER_FREE and os.access(RAM_FOLDER,
                                                                     os.W_OK | os.X_OK):
        return RAM_FOLDER
    return None


def remove_stale_metrics(parent: str) -> None:
    """Remove the metric folders of servers that ended without their cleanup (killed): in
    shared memory they would hold memory until the next boot. A folder is stale when nobody
    holds the lock of its ``.lock`` file, which its server's processes hold while they run
    (a lock, not a process id, so that a server in another PID namespace is not mistaken)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(METRICS_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or (
                    entry.stat(follow_symlinks=False).st_uid != os.getuid()):
                continue
            fd = os.open(os.path.join(entry.path, ".lock"), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running server's
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)


def use_multiprocess_metrics() -> str:
    """Put prometheus_client into multiprocess mode with a fresh private folder, locked for as
    long as this process and its workers run. Must run before prometheus_client is first
    imported (it reads the variable at import)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set")
    parent = metrics_parent_folder()
    if parent is not None:
        remove_stale_metrics(parent)
    path = tempfile.mkdtemp(prefix=METRICS_PREFIX, dir=parent)
    # Locked before it is named .lock, so that a server starting beside this one never finds
    # it unlocked. Held by the open file, which the workers inherit.
    fd = os.open(os.path.join(path, ".lock.new"), os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(os.path.join(path, ".lock.new"), os.path.join(path, ".lock"))
    os.environ[METRICS_ENV] = path
    return path


def reserve(value: str) -> tuple[socket.socket, str]:
    """Bind (never listen) a SO_REUSEPORT socket on *value*; return it and ``host:port``."""
    from ingress.server import bind_socket, parse_listen

    host, port = parse_listen(value)
    try:
        sock, *others = bind_socket(host, port, reuse_port=True)
    except OSError as exc:
        raise IngressError(f"cannot listen on {value}: {exc.strerror or exc}") from None
    for other in others:  # the workers listen on the first address only
        other.close()
    shown = f"[{host}]" if ":" in host else host
    return sock, f"{shown}:{sock.getsockname()[1]}"


class Supervisor:
    def __init__(self, cfg: config_mod.Config, runner, metrics_dir: str | None):
        from ingress import server as server_mod

        server_mod.tls_context(cfg)  # a bad certificate is an error here, not in N workers
        server_mod.prepare_spool(cfg)
        self.cfg = cfg
        self.runner = runner  # runner(coroutine) runs it on a fresh event loop
        self.metrics_dir = metrics_dir
        self.count = cfg.server["workers"]
        self.context = multiprocessing.get_context("fork")
        self.open_connections = self.context.RawArray("q", self.count)
        self.key_table = shared_table(self.context, self.count)
        self.processes: list = [None] * self.count
        self.started_at = [0.0] * self.count
        self.failed_starts = 0
        self.exit_codes: dict[int, int] = {}
        self.stopping = False
        self.deadline = 0.0
        self.placeholders: list[socket.socket] = []
        self.alive_r, self.alive_w = os.pipe()  # never written: EOF tells workers we are gone
        self.ready_r, self.ready_w = os.pipe()  # workers report "listening" or their error
        self.wake_r, self.wake_w = socket.socketpair()  # signal numbers (set_wakeup_fd)
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)

    # --- the workers -----------------------------------------------------------------------

    def _reserve(self, values: list[str]) -> list[str]:
        resolved = []
        for value in values:
            sock, where = reserve(value)
            self.placeholders.append(sock)
            resolved.append(where)
        return resolved

    def _worker(self, slot: int):
        from ingress.server import Worker

        return Worker(slot, self.listen, self.listen_tls, self.metrics_listen if slot == 0 else "",
                      self.open_connections, self.alive_r, self.key_table)

    def start(self, slot: int) -> None:
        self.open_connections[slot] = 0
        clear_region(self.key_table, slot)
        worker = self._worker(slot)
        process = self.context.Process(target=self._child, args=(slot, self.cfg, worker),
                                       name=f"ingress-worker-{slot}")
        # Signals stay blocked in the child until its event loop handles them (server.run).
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        self.processes[slot] = process
        self.started_at[slot] = time.monotonic()

    def _child(self, slot: int, cfg: config_mod.Config, worker) -> None:
        from ingress.server import run

        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        for sock in (*self.placeholders, self.wake_r, self.wake_w):
            sock.close()
        os.close(self.alive_w)
        os.close(self.ready_r)

        def ready(lines: list[str]) -> None:
            self._report({"slot": slot, "lines": lines})

        code = 1
        try:
            code = self.runner(run(cfg, ready, worker))
        except IngressError as exc:
            self._report({"slot": slot, "error": exc.lines, "code": exc.exit_code})
            code = exc.exit_code
        finally:
            logging.shutdown()  # the process ends with os._exit: flush the log lines now
        sys.exit(code)

    def _report(self, message: dict) -> None:
        os.write(self.ready_w, (json.dumps(message) + "\n").encode())

    def _ended(self, slot: int) -> None:
        process = self.processes[slot]
        process.join()
        self.processes[slot] = None
        self.open_connections[slot] = 0
        clear_region(self.key_table, slot)
        if self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self.metrics_dir)
        self.exit_codes[slot] = process.exitcode
        if self.stopping:
            return
        lived = time.monotonic() - self.started_at[slot]
        self.failed_starts = self.failed_starts + 1 if lived < QUICK_DEATH else 0
        log.error("worker %d (pid %d) exited with %s after %.1fs", slot, process.pid,
                  process.exitcode, lived)
        if self.failed_starts >= FAILED_STARTS:
            log.error("workers keep failing at start; stopping")
            self.stop()
            self.exit_codes[slot] = process.exitcode or 1
            return
        self.start(slot)

    # --- signals -----------------------------------------------------------------------------

    def reload(self) -> None:
        try:
            cfg = config_mod.load(self.cfg.path)
        except IngressError:
            pass  # every worker logs why and keeps its config; so does the parent
        else:
            if cfg.server["workers"] != self.count:
                log.warning("reload: a change of server.workers takes effect at the next restart")
            self.cfg = cfg
        for process in self.processes:
            if process is not None:
                os.kill(process.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.deadline = time.monotonic() + self.cfg.server["drain_seconds"] + KILL_GRACE
        for process in self.processes:
            if process is not None:
                os.kill(process.pid, signal.SIGTERM)

    # --- the parent's loop -------------------------------------------------------------------

    def serve(self, ready) -> int:
        server = self.cfg.server
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self.wake_w.fileno())
        try:
            self.listen = self._reserve(server["listen"])
            self.listen_tls = self._reserve(server["listen_tls"])
            self.metrics_listen = self._reserve([server["metrics_listen"]])[0] if (
                server["metrics_listen"]) else ""
            for slot in range(self.count):
                self.start(slot)
            log.info("started %d workers", self.count)
            return self._loop(ready)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in (*self.placeholders, self.wake_r, self.wake_w):
                sock.close()
            for fd in (self.alive_r, self.alive_w, self.ready_r, self.ready_w):
                os.close(fd)

    def _loop(self, ready) -> int:
        listening: dict[int, list[str]] = {}
        buffer = b""
        announced = False
        while True:
            alive = {p.sentinel: slot for slot, p in enumerate(self.processes) if p is not None}
            if self.stopping and not alive:
                break
            if self.stopping and time.monotonic() > self.deadline:
                for process in self.processes:
                    if process is not None:
                        log.error("worker pid %d did not stop; killing it", process.pid)
                        process.kill()
                self.deadline = float("inf")
            for obj in wait([self.ready_r, self.wake_r, *alive], timeout=1.0):
                if obj == self.ready_r:
                    buffer += os.read(self.ready_r, 65536)
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        message = json.loads(line)
                        if "error" in message:
                            for text in message["error"]:
                                print(text, file=sys.stderr, flush=True)
                            if not announced:
                                self.stop()
                                self.exit_codes[-1] = message["code"]
                        else:
                            listening[message["slot"]] = message["lines"]
                elif obj is self.wake_r:
                    for signum in self._signals():
                        if signum == signal.SIGHUP:
                            self.reload()
                        else:
                            self.stop()
                else:
                    self._ended(alive[obj])
            if not announced and len(listening) == self.count and not self.stopping:
                ready(listening[0])
                announced = True
        return 0 if all(code == 0 for code in self.exit_codes.values()) else (
            self.exit_codes.get(-1) or 1)

    def _signals(self) -> list[int]:
        try:
            return list(self.wake_r.recv(64))
        except BlockingIOError:
            return []


def serve(cfg: config_mod.Config, ready, runner, metrics_dir: str | None) -> int:
    """Run ``cfg.server["workers"]`` worker processes until SIGTERM/SIGINT; return the exit
    status. *ready* gets the ready lines once; *runner* runs a coroutine on a new event loop."""
    return Supervisor(cfg, runner, metrics_dir).serve(ready)
