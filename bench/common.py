"""Helpers shared by the benchmark scripts: running coroutines, starting and stopping the server
under test, measuring a process tree, and driving Postfix's smtp-source."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def run(coro, uvloop: bool = True):
    """Run *coro* to completion, on uvloop when it is installed and wanted."""
    try:
        import uvloop as uvloop_mod
    except ImportError:
        uvloop_mod = None
    if uvloop_mod is None or not uvloop:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop_mod.new_event_loop) as runner:
            return runner.run(coro)
    uvloop_mod.install()
    return asyncio.run(coro)


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM *process* and wait; SIGKILL it if it still runs after *grace* seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- processes: the server under test -------------------------------------------------------

READY = re.compile(r"^ingress: listening on \S+:(\d+) \(smtp\)")


def start_ingress(config: dict, workdir: Path, *, python: str = sys.executable,
                  args: tuple[str, ...] = (), timeout: float = 60,
                  prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Run ``PYTHON -m ingress serve`` on *config* (written as JSON into *workdir*, where its log
    goes too, ``ingress.log``), under the command *prefix* if any (say valgrind); return the
    process and its first SMTP port once it is ready."""
    workdir = workdir.resolve()
    path = workdir / "ingress.json"
    path.write_text(json.dumps(config, indent=1))
    log_path = workdir / "ingress.log"
    with open(log_path, "wb") as log:
        command = [*prefix, python, "-m", "ingress", "serve", "--config", str(path), *args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            break
        found = READY.match(line)
        if found:
            # keep reading its stdout, so that later lines can never fill the pipe
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, int(found[1])
    process.kill()
    process.wait()
    raise RuntimeError("ingress did not get ready:\n"
                       + log_path.read_text(errors="replace")[-3000:])


def process_tree(pid: int) -> list[int]:
    """*pid* and its live descendants (workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of *pid* and its live descendants (threads included)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of *pid* and its live descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# --- the load: Postfix's smtp-source --------------------------------------------------------

SMTP_SOURCE = "/usr/sbin/smtp-source"


def smtp_source(port: int, *, sessions: int, messages: int, size: int, to: str,
                many: bool = False, timeout: float = 600) -> dict:
    """Run smtp-source against 127.0.0.1:*port*: messages acknowledged, wall-clock seconds, and
    the exit status with the end of its error output (it stops at the first unexpected reply;
    what it counted by then was acknowledged)."""
    argv = [SMTP_SOURCE, "-c", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "sender@client.test", "-t", to, "-M", "client.test",
            *(["-d"] if many else []), f"127.0.0.1:{port}"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    counts = [c for c in done.stdout.decode().replace("\r", "\n").split() if c.isdigit()]
    return {"acked": int(counts[-1]) if counts else 0, "elapsed": elapsed,
            "returncode": done.returncode, "stderr": done.stderr.decode(errors="replace")[-300:]}


def smtplib_rate(host: str, port: int, messages: list[bytes], clients: int, *, helo: str,
                 sender: str, recipient: str) -> float:
    """Messages per second for *messages* sent with smtplib over *clients* connections at once
    (message i on connection i % clients); any failure raises."""
    import smtplib

    errors: list[BaseException] = []

    def client(share: range) -> None:
        try:
            with smtplib.SMTP(host, port, timeout=30) as smtp:
                smtp.ehlo(helo)
                for n in share:
                    smtp.sendmail(sender, [recipient], messages[n])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    count = len(messages)
    threads = [threading.Thread(target=client, args=(range(i, count, clients),))
               for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    elapsed = time.perf_counter() - started
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"a client failed: {errors[:1]}")
    return count / elapsed
