#!/usr/bin/env python3
"""What a hostile client costs everybody else: a normal client's latency and the server's memory
while an attack runs.

    python bench/hostile.py --attack auth_flood [--seconds 20] [--server-python PYTHON]

It starts ``PYTHON -m ingress serve`` (default: this interpreter) on a free port of 127.0.0.1
with a config of its own, merged with what the attack module asks for, then runs two phases of
``--seconds`` each:

1. ``quiet``: the normal client alone;
2. ``attack``: the normal client while the attack runs.

The normal client connects from 127.0.0.1 and sends one 2 KB message per session, one session
every 50 ms (or right after the previous one when that took longer), every session bounded
by a timeout; each session's latency (connect to the reply
to QUIT) is recorded. Attacks live in ``bench/attacks/<name>.py`` and connect from other loopback
addresses (127.0.0.2 and up) so that per-address limits tell them apart from the normal client.
An attack module defines ``config(workdir) -> dict`` (merged into the server config) and
``async def attack(port, stop: asyncio.Event) -> dict`` (runs until *stop* is set, returns its
own counts). The server's resident memory (the sum over its process tree) is sampled every 50 ms.

``--server-python`` lets the same script measure another installation (say, a checkout of an
older commit in its own virtual environment), so before/after numbers come from one machine and
one client. ``--set PATH=VALUE`` (repeatable; VALUE is JSON, else a string) sets one more config
value after the attack's, e.g. ``--set plugins.max_connections.per_ip=10``: a setting the older
installation does not know can then be given to the newer one only. Every loop is bounded;
only 127.0.0.1-127.0.0.255 are contacted. Prints one JSON object. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import start_ingress, tree_cpu_seconds, tree_rss_kib
from common import stop as stop_process

HOST = "127.0.0.1"
HOSTNAME = "hostile.test"
INTERVAL = 0.05  # seconds from the start of one normal session to the start of the next
MESSAGE = (
    "From: normal@hostile.test\r\nTo: normal@hostile.test\r\nSubject: normal\r\n\r\n"
    + ("x" * 76 + "\r\n") * 26
).encode()


def merge(base: dict, extra: dict) -> dict:
    """*base* with *extra* merged in, tables recursively."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def start_server(python: str, workdir: Path, extra: dict) -> tuple[subprocess.Popen, int]:
    config = merge({
        "server": {"hostname": HOSTNAME, "listen": [f"{HOST}:0"], "drain_seconds": 1},
        "directory": {"domains": ["hostile.test"],
                      "domain_settings": {"hostile.test": {"catch_all": True}}},
        "delivery": {"maildir": str(workdir / "mail"), "queue": str(workdir / "queue")},
    }, extra)
    return start_ingress(config, workdir, python=python)


async def expect(reader: asyncio.StreamReader, code: str) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code.encode()):
            raise RuntimeError(f"expected {code}, got {line[:80]!r}")
        if line[3:4] != b"-":
            return


async def normal_session(port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await expect(reader, "220")
        for command, code in ((b"EHLO normal.test", "250"),
                              (b"MAIL FROM:<normal@hostile.test>", "250"),
                              (b"RCPT TO:<normal@hostile.test>", "250"), (b"DATA", "354")):
            writer.write(command + b"\r\n")
            await expect(reader, code)
        writer.write(MESSAGE + b".\r\nQUIT\r\n")
        await expect(reader, "250")
        await expect(reader, "221")
    finally:
        writer.close()


async def normal_client(port: int, stop: asyncio.Event, timeout: float) -> dict:
    latencies, failures = [], []
    while not stop.is_set():
        started = time.monotonic()
        try:
            await asyncio.wait_for(normal_session(port), timeout)
            latencies.append(time.monotonic() - started)
        except (OSError, RuntimeError, asyncio.TimeoutError) as error:
            failures.append(f"{type(error).__name__}: {error}"[:120])
        # a steady 20 sessions a second: the client measures the server, it does not load it
        await asyncio.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))
    ms = sorted(1000 * value for value in latencies)

    def pct(p: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None

    return {"sessions": len(latencies), "failed": len(failures), "first_failures": failures[:3],
            "p50_ms": round(statistics.median(ms), 1) if ms else None,
            "p99_ms": pct(0.99), "max_ms": round(ms[-1], 1) if ms else None}


async def sample_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, tree_rss_kib(pid))
        await asyncio.sleep(0.05)
    return peak


async def phase(pid: int, port: int, seconds: float, attack=None) -> dict:
    stop = asyncio.Event()
    cpu_before = tree_cpu_seconds(pid)
    tasks = [asyncio.ensure_future(normal_client(port, stop, timeout=max(30.0, seconds))),
             asyncio.ensure_future(sample_rss(pid, stop))]
    if attack is not None:
        tasks.append(asyncio.ensure_future(attack(port, stop)))
    await asyncio.sleep(seconds)
    stop.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    out = {"normal": results[0], "peak_rss_mb": round(results[1] / 1024, 1),
           "server_cpu_s": round(tree_cpu_seconds(pid) - cpu_before, 2)}
    if attack is not None:
        out["attack"] = results[2]
    return out


def setting(text: str) -> dict:
    """``a.b.c=VALUE`` as ``{"a": {"b": {"c": VALUE}}}``."""
    path, eq, raw = text.partition("=")
    if not eq or not path:
        raise argparse.ArgumentTypeError(f"expected PATH=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


async def measure(args, module) -> dict:
    with tempfile.TemporaryDirectory(prefix="ingress-hostile-") as tmp:
        workdir = Path(tmp)
        extra = module.config(workdir)
        for value in args.set:
            extra = merge(extra, value)
        proc, port = start_server(args.server_python, workdir, extra)
        try:
            await asyncio.sleep(1)
            quiet = await phase(proc.pid, port, args.seconds)
            attacked = await phase(proc.pid, port, args.seconds, module.attack)
        finally:
            stop_process(proc, grace=10)
        return {"attack": args.attack, "seconds": args.seconds,
                "server_python": args.server_python, "config": extra,
                "quiet": quiet, "attacked": attacked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", required=True, help="a module name in bench/attacks/")
    parser.add_argument("--seconds", type=float, default=20, help="length of each phase")
    parser.add_argument("--server-python", default=sys.executable,
                        help="the interpreter whose installed ingress is measured")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="PATH=VALUE",
                        help="one more config value, after the attack's (repeatable)")
    args = parser.parse_args()
    module = importlib.import_module(f"attacks.{args.attack}")
    print(json.dumps(asyncio.run(measure(args, module)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
