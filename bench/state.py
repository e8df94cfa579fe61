#!/usr/bin/env python3
"""What a Redis round trip costs per check: msgs/s of one ingress with the state plugins on
``server.state = "memory"`` and on a local Redis, in the same run.

    python bench/state.py [--messages 2000] [--sessions 16] [--size 2048] [--repeat 3]

Needs ``smtp-source`` (Postfix), ``redis-server``, the ``redis`` extra and the contrib packages
``ingress-ratelimit`` and ``ingress-greylist`` installed. Everything listens on 127.0.0.1 only.

Configurations, each a fresh ``ingress serve`` (one process, default config plus a local domain,
durable Maildir delivery) driven by ``smtp-source -s SESSIONS -m MESSAGES -l SIZE`` (one message
per connection):

- ``none``: neither plugin (the reference);
- ``ratelimit``: limits far above the load, so nothing is refused; per message it checks the
  connection (a ``get`` and an ``incr``) and the MAIL (the same): 4 state operations;
- ``greylist``: ``delay_seconds = 0`` and the client's one triplet passed before the run (two
  attempts with smtplib), so each RCPT is one ``get`` that finds it passed;

each with ``state = "memory"`` and with ``state`` on one ``redis-server`` started here (no
persistence). Configurations are interleaved within each repetition; the table gives medians of
msgs/s and of the CPU time the ingress process (and redis-server) spent per message. Every run
checks that the Maildir holds exactly the messages acknowledged.

Then the store alone, in this process (uvloop when installed): microseconds per ``incr`` one
after the other (the round trip), and with 16 tasks at once (operations per second and CPU
time per operation of the client side). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from run import wait_quiet

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DOMAIN = "bench.test"
SENDER = "sender@client.test"
RCPT = f"user0@{DOMAIN}"
TIMEOUT = 300  # seconds any one client run may take

PLUGINS = {
    "none": {},
    "ratelimit": {"ratelimit": {"window_seconds": 3600, "max_connections": 10**9,
                                "max_messages": 10**9}},
    "greylist": {"greylist": {"delay_seconds": 0}},
}
OPS = {"none": 0, "ratelimit": 4, "greylist": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)], stdout=log, stderr=log)
    for _ in range(200):  # bounded: 10 s
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            pass
        time.sleep(0.05)
    common.stop(process)
    raise RuntimeError("redis-server did not start")


def start_ingress(workdir: Path, plugins: dict, state: str) -> tuple[subprocess.Popen, int]:
    workdir.mkdir(parents=True)
    config = {
        "server": {"hostname": DOMAIN, "listen": ["127.0.0.1:0"], "drain_seconds": 5,
                   "state": state},
        "directory": {"domains": [DOMAIN],
                      "users": [{"address": RCPT, "password": "pw"}]},
        "delivery": {"maildir": str(workdir / "mail"), "queue": str(workdir / "queue")},
        "plugins": plugins,
    }
    path = workdir / "ingress.json"
    path.write_text(json.dumps(config, indent=1))
    with open(workdir / "ingress.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ingress", "serve", "--config",
                                    str(path)], stdout=subprocess.PIPE, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            break
        found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(smtp\)", line)
        if found:
            return process, int(found[1])
    common.stop(process)
    raise RuntimeError("ingress did not start:\n" + (workdir / "ingress.log").read_text())


def pass_triplet(port: int) -> None:
    """Two attempts: the first is greylisted, the second (delay 0) passes the triplet (on
    Redis it may have passed in an earlier repetition already)."""
    codes = []
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.helo("client.test")
            client.mail(SENDER)
            codes.append(client.rcpt(RCPT)[0])
    if codes not in ([451, 250], [250, 250]):
        raise RuntimeError(f"greylist did not pass the triplet: {codes}")


def one_run(kind: str, state_name: str, redis_url: str, args, root: Path) -> dict:
    workdir = root / f"{kind}-{state_name}-{time.monotonic_ns()}"
    state = "memory" if state_name == "memory" else redis_url
    process, port = start_ingress(workdir, PLUGINS[kind], state)
    try:
        if kind == "greylist":
            pass_triplet(port)
        redis_pid = args.redis_pid
        cpu0, rcpu0 = cpu_seconds(process.pid), cpu_seconds(redis_pid)
        argv = [SMTP_SOURCE, "-c", "-s", str(args.sessions), "-m", str(args.messages),
                "-l", str(args.size), "-f", SENDER, "-t", RCPT, "-M", "client.test",
                f"127.0.0.1:{port}"]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
        elapsed = time.perf_counter() - started
        cpu, rcpu = cpu_seconds(process.pid) - cpu0, cpu_seconds(redis_pid) - rcpu0
    finally:
        common.stop(process)
        process.stdout.close()
    counts = [c for c in done.stdout.decode().replace("\r", "\n").split() if c.isdigit()]
    acked = int(counts[-1]) if counts else 0
    stored = sum(1 for _ in (workdir / "mail").glob("*/*/new/*"))
    problems = []
    if done.returncode or acked != args.messages:
        problems.append(f"smtp-source: {acked} acked, exit {done.returncode} "
                        f"{done.stderr.decode(errors='replace')[-200:]}")
    if stored != acked:
        problems.append(f"{stored} stored != {acked} acked")
    shutil.rmtree(workdir, ignore_errors=True)
    return {"rate": acked / elapsed, "cpu_us": cpu / max(acked, 1) * 1e6,
            "redis_us": rcpu / max(acked, 1) * 1e6, "check": "; ".join(problems) or "ok"}


def store_ops(url: str, count: int) -> dict:
    """Sequential and 16-way concurrent incr on a fresh backend for *url*."""
    from ingress.state import open_backend

    async def measure():
        backend = open_backend(url, 5.0)
        store = backend.store("bench")
        try:
            await store.incr("warm")
            started = time.perf_counter()
            for _ in range(count):
                await store.incr("seq", ttl=60)
            sequential = (time.perf_counter() - started) / count

            async def worker(i):
                for _ in range(count // 16):
                    await store.incr(f"c{i}", ttl=60)
            cpu0, started = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(16)))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
            done = count // 16 * 16
            return {"seq_us": sequential * 1e6, "ops_s": done / wall, "cpu_us": cpu / done * 1e6}
        finally:
            await backend.close()

    return common.run(measure())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=".", help="where the temporary folders go")
    p.add_argument("--ops", type=int, default=20000, help="store operations per measurement")
    p.add_argument("--quiet", type=float, default=None,
                   help="before each run wait (up to 120 s) until other programs use less "
                        "than this share of the CPUs")
    args = p.parse_args()
    for tool in (SMTP_SOURCE, REDIS_SERVER):
        if not Path(tool).exists():
            sys.exit(f"{tool} is needed")
    root = Path(tempfile.mkdtemp(prefix="bench-state-", dir=args.workdir))
    redis, redis_port = start_redis(root)
    args.redis_pid = redis.pid
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    cells = [("none", "memory"), ("ratelimit", "memory"), ("ratelimit", "redis"),
             ("greylist", "memory"), ("greylist", "redis")]
    results: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    failed = False
    try:
        for rep in range(args.repeat):
            for cell in cells:
                busy = wait_quiet(args.quiet, 120)
                result = one_run(*cell, redis_url, args, root)
                result["busy"] = busy
                results[cell].append(result)
                failed |= result["check"] != "ok"
                print(f"rep {rep + 1} {cell[0]:9} {cell[1]:6} {result['rate']:7.0f} msgs/s "
                      f"{result['cpu_us']:6.0f} us/msg ingress {result['redis_us']:5.1f} "
                      f"us/msg redis  other load {busy:.0%}  {result['check']}", flush=True)
        ops = {}
        for name, url in (("memory", "memory"), ("redis", redis_url)):
            ops[name] = [store_ops(url, args.ops) for _ in range(args.repeat)]
    finally:
        common.stop(redis)
        shutil.rmtree(root, ignore_errors=True)

    def med(cell, key):
        return statistics.median(r[key] for r in results[cell])

    print(f"\nsmtp-source -s {args.sessions} -m {args.messages} -l {args.size}, "
          f"one message per connection, {args.repeat} repetitions (medians)\n")
    print("| plugin | state | state ops/msg | msgs/s | vs memory | ingress CPU µs/msg "
          "| redis-server CPU µs/msg | check |")
    print("|---|---|---|---|---|---|---|---|")
    for cell in cells:
        base = ("none", "memory") if cell[0] == "none" else (cell[0], "memory")
        rate = med(cell, "rate")
        checks = {r["check"] for r in results[cell]}
        print(f"| {cell[0]} | {cell[1]} | {OPS[cell[0]]} | {rate:.0f} | "
              f"{rate / med(base, 'rate'):.2f} | {med(cell, 'cpu_us'):.0f} | "
              f"{med(cell, 'redis_us'):.1f} | {', '.join(sorted(checks))} |")
    busy = [r["busy"] for rs in results.values() for r in rs]
    print(f"\nother programs' share of the CPUs before each run: "
          f"median {statistics.median(busy):.0%}, max {max(busy):.0%}")
    print(f"\nThe store alone: {args.ops} incr, medians of {args.repeat}\n")
    print("| state | µs per incr, one after the other | incr/s, 16 at once "
          "| client CPU µs per incr |")
    print("|---|---|---|---|")
    for name, runs in ops.items():
        print(f"| {name} | {statistics.median(r['seq_us'] for r in runs):.1f} | "
              f"{statistics.median(r['ops_s'] for r in runs):.0f} | "
              f"{statistics.median(r['cpu_us'] for r in runs):.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
