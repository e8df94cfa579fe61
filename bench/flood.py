#!/usr/bin/env python3
"""Flood a real ingress server with idle connections and measure how max_connections and
session_timeout answer it, and the server's memory (VmRSS) throughout.

    python bench/flood.py [--connections 2000] [--limit 500] [--idle 10]

It starts ``python -m ingress serve`` on a free port of 127.0.0.1 (nothing else is ever
contacted), then:

1. opens --connections connections at once, none of which sends anything: exactly --limit must
   get ``220`` and stay open, every other one ``421 4.3.2 <hostname> Too many connections`` and
   be closed by the server; the time from connect to that 421 is measured;
2. waits until the session timeout (--idle seconds) cuts the held ones: each must get
   ``421 4.4.2 <hostname> Session timeout`` and be closed, not before --idle seconds;
3. connects --limit + 1 new clients at once: --limit must be served again, one refused.

VmRSS of the server (/proc/<pid>/status) is sampled every 50 ms from start to stop. Every wait
is bounded. Exit status 0 when every expectation held. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HOST = "127.0.0.1"
HOSTNAME = "flood.test"


def raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed")


def start_server(workdir: Path, limit: int, idle: float) -> tuple[subprocess.Popen, int]:
    config = {
        "server": {"hostname": HOSTNAME, "listen": [f"{HOST}:0"], "drain_seconds": 1},
        "directory": {"domains": ["flood.test"]},
        "delivery": {"maildir": str(workdir / "mail"), "queue": str(workdir / "queue")},
        # every connection comes from 127.0.0.1: only the server's limit is measured here
        "plugins": {"max_connections": {"limit": limit, "per_ip": 0},
                    "session_timeout": {"enabled": True, "minutes": idle / 60}},
    }
    return common.start_ingress(config, workdir)


class Sampler:
    """VmRSS every 50 ms, tagged with the phase it was taken in."""

    def __init__(self, pid: int):
        self.pid, self.phase, self.samples = pid, "start", []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), self.phase, common.tree_rss_kib(self.pid)))
            except (FileNotFoundError, ProcessLookupError):
                return
            await asyncio.sleep(0.05)

    def now(self) -> int:
        return common.tree_rss_kib(self.pid)

    def peak(self, phase: str) -> int:
        return max(kib for _, p, kib in self.samples if p == phase)

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def connect(port: int, timeout: float = 30):
    """Connect, read the greeting. Returns (reader, writer, code, text, seconds from connected
    to greeting, when the greeting came); the connection is left open."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    connected = time.monotonic()
    line = await asyncio.wait_for(reader.readline(), timeout)
    greeted = time.monotonic()
    text = line.decode(errors="replace").rstrip("\r\n")
    return reader, writer, int(text[:3] or 0), text[4:], greeted - connected, greeted


def server_side_durations(log: str, marker: str) -> list[float]:
    """Seconds from accept to the end of each session whose log has *marker*, as the server
    measured them (the client's own clock is skewed by its 2,000 coroutines)."""
    marked = set(re.findall(r"session (\w+) \S+" + marker, log))
    ended = re.findall(r"session (\w+) \S+ ended: \d+ message\(s\), ([\d.]+)s", log)
    return [float(seconds) for sid, seconds in ended if sid in marked]


async def closed_by_server(reader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except (asyncio.TimeoutError, ConnectionError):
        return False


async def close(writer) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (asyncio.TimeoutError, ConnectionError):
        pass


def ms(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "p50_ms": round(pick(0.5) * 1000, 1),
            "p99_ms": round(pick(0.99) * 1000, 1), "max_ms": round(values[-1] * 1000, 1),
            "mean_ms": round(statistics.fmean(values) * 1000, 1)}


async def flood(args) -> dict:
    refused_text = f"4.3.2 {HOSTNAME} Too many connections"
    timeout_text = f"4.4.2 {HOSTNAME} Session timeout"
    workdir = Path(tempfile.mkdtemp(prefix="ingress-flood-"))
    proc, port = start_server(workdir, args.limit, args.idle)
    report: dict = {"connections": args.connections, "limit": args.limit, "idle_s": args.idle,
                    "python": sys.version.split()[0], "server_pid": proc.pid}
    ok = True
    try:
        await asyncio.sleep(0.5)
        sampler = Sampler(proc.pid)
        await asyncio.sleep(0.5)
        report["rss_kib_idle_server"] = sampler.now()
        cpu0 = common.tree_cpu_seconds(proc.pid)

        # 1. the flood: all at once, nobody sends anything
        sampler.phase = "flood"
        t0 = time.monotonic()
        results = await asyncio.gather(*(connect(port) for _ in range(args.connections)),
                                       return_exceptions=True)
        report["flood_all_greeted_s"] = round(time.monotonic() - t0, 2)
        errors = [r for r in results if isinstance(r, BaseException)]
        ok_results = [r for r in results if not isinstance(r, BaseException)]
        held = [r for r in ok_results if r[2] == 220]
        refused = [r for r in ok_results if r[2] == 421 and r[3] == refused_text]
        other = [r for r in ok_results if r not in held and r not in refused]
        refused_closed = await asyncio.gather(*(closed_by_server(r[0], 10) for r in refused))
        for r in refused:
            await close(r[1])
        report["flood"] = {
            "served_220": len(held), "refused_421_4.3.2": len(refused),
            "refused_and_closed_by_server": sum(refused_closed), "other_replies": len(other),
            "connect_errors": len(errors),
            "client_seen_220_after_flood_start": ms([r[5] - t0 for r in held]),
            "client_seen_421_after_flood_start": ms([r[5] - t0 for r in refused]),
        }
        ok &= len(held) == args.limit and len(refused) == args.connections - args.limit
        ok &= all(refused_closed) and not other and not errors
        sampler.phase = "held"
        await asyncio.sleep(1)
        report["rss_kib_holding_limit"] = sampler.now()
        report["cpu_s_flood"] = round(common.tree_cpu_seconds(proc.pid) - cpu0, 2)

        # 2. the session timeout cuts the idle ones
        async def cut(r):
            reader, writer, *_, greeted = r
            try:
                line = await asyncio.wait_for(reader.readline(), args.idle + 30)
            except (asyncio.TimeoutError, ConnectionError):
                return None, 0.0, False
            cut_at = time.monotonic() - t0
            closed = await closed_by_server(reader, 10)
            await close(writer)
            return line.decode().rstrip("\r\n"), cut_at, closed

        cuts = await asyncio.gather(*(cut(r) for r in held))
        sampler.phase = "after_cut"
        good = [c for c in cuts if c[0] == f"421 {timeout_text}" and c[2]]
        cut_at = [c[1] for c in cuts if c[0]]
        report["session_timeout"] = {
            "cut_with_421_4.4.2_and_closed": len(good),
            "client_seen_421_after_flood_start_s": [round(min(cut_at), 2), round(max(cut_at), 2)]
            if cut_at else None,
        }
        ok &= len(good) == len(held) and bool(cut_at) and min(cut_at) >= args.idle
        await asyncio.sleep(1)
        report["rss_kib_after_cut"] = sampler.now()

        # 3. the slots are free again
        sampler.phase = "again"
        again = await asyncio.gather(*(connect(port) for _ in range(args.limit + 1)),
                                     return_exceptions=True)
        again_ok = [r for r in again if not isinstance(r, BaseException)]
        report["after_cut_new_sessions"] = {
            "served_220": sum(r[2] == 220 for r in again_ok),
            "refused_421": sum(r[2] == 421 for r in again_ok),
            "errors": len(again) - len(again_ok),
            "client_seen_connected_to_220": ms([r[4] for r in again_ok if r[2] == 220]),
        }
        ok &= report["after_cut_new_sessions"]["served_220"] == args.limit
        ok &= report["after_cut_new_sessions"]["refused_421"] == 1
        for r in again_ok:
            r[1].write(b"QUIT\r\n")
            await close(r[1])
        await asyncio.sleep(1)
        report["rss_kib_end"] = sampler.now()
        await sampler.stop()
        report["rss_kib_peak"] = {p: sampler.peak(p) for p in
                                  ("flood", "held", "after_cut", "again")}
        report["rss_samples"] = len(sampler.samples)
        start = sampler.samples[0][0]
        report["rss_timeline_kib"] = [  # one sample per second: [seconds, phase, VmRSS KiB]
            [round(at - start, 1), phase, kib] for i, (at, phase, kib) in
            enumerate(sampler.samples) if i % 20 == 0]
        report["cpu_s_total"] = round(common.tree_cpu_seconds(proc.pid) - cpu0, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    report["server_exit"] = proc.returncode
    log = (workdir / "ingress.log").read_text(errors="replace")
    refusals = server_side_durations(log, " refused by max_connections")
    report["server_side_accept_to_refusal_done"] = ms(refusals)
    idle_cut = server_side_durations(log, ": session timeout")
    report["server_side_session_length_of_idle_ones_s"] = (
        [round(min(idle_cut), 3), round(max(idle_cut), 3)] if idle_cut else None)
    ok &= len(refusals) == args.connections - args.limit + 1
    ok &= len(idle_cut) == args.limit and min(idle_cut) >= args.idle
    report["ok"] = bool(ok) and proc.returncode == 0
    if args.keep:
        report["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--idle", type=float, default=10.0, help="session timeout, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (ingress.log)")
    args = parser.parse_args()
    if not 0 < args.limit < args.connections <= 20_000:
        parser.error("need 0 < limit < connections <= 20000")
    raise_own_fd_limit(args.connections + 100)
    report = asyncio.run(flood(args))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
