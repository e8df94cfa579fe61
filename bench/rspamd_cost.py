"""What the rspamd plugin costs per message: messages per second of 2 KB messages with and without
it, in the same run.

Starts one rspamd as contrib/ingress-rspamd's tests do (Debian's package and rules, everything
else in a temporary folder, free 127.0.0.1 port, no network), and two ingress servers, one
without the plugin and one with it. Each round sends --messages messages to each server (smtplib,
--clients connections at once, each sending its share on one connection), alternating the
servers so that both see the same machine load; the best round of each is reported. Run from
the repository root with ingress and ingress-rspamd installed:

    python bench/rspamd_cost.py --messages 300 --rounds 3 --clients 1

rspamd's own time per scan (from its log) is printed too: with one client the difference
between the two servers is that time plus the plugin's HTTP exchange; with many clients a
single rspamd worker (--workers 1) is the bottleneck. --instant replaces rspamd with a stand-in
that answers at once: what is left is the plugin's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contrib" / "ingress-rspamd" / "tests"))

from common import smtplib_rate  # noqa: E402
from conftest import Rspamd  # noqa: E402  (the tests' rspamd, reused)

from ingress.testing import server_config, start_subprocess  # noqa: E402

LOCAL = {"directory": {"domains": ["example.test"],
                       "domain_settings": {"example.test": {"catch_all": True}}}}
WORDS = (b"the quarterly report is attached and the figures for the northern region look "
         b"better than expected so we should talk about the budget on thursday ")


def message(n: int) -> bytes:
    """About 2 KB of ordinary text mail, its own Message-ID."""
    head = (f"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.test>\r\n"
            f"Subject: report {n}\r\nMessage-ID: <bench-{n}@example.org>\r\n"
            "Date: Sun, 06 Dec 2026 15:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    body = b""
    while len(head) + len(body) < 2048 - 80:
        body += WORDS[:76] + b"\r\n"
    return head + body


ANSWER = json.dumps({"action": "no action", "score": 0.5, "required_score": 15.0,
                     "symbols": {f"SYMBOL_{i}": {"name": f"SYMBOL_{i}", "score": 0.0}
                                 for i in range(20)}}).encode()


class Instant:
    """--instant: a stand-in on 127.0.0.1 that answers every request at once with a fixed
    rspamd-like answer, so the difference measured is the plugin's own cost (its HTTP exchange
    and the server's work), not rspamd's scan."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))
            await writer.drain()
        finally:
            writer.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run(server, count: int, clients: int) -> float:
    """Messages per second for *count* messages over *clients* connections."""
    return smtplib_rate(server.host, server.port, [message(n) for n in range(count)], clients,
                        helo="bench.example.org", sender="alice@example.org",
                        recipient="bob@example.test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="rspamd normal workers")
    parser.add_argument("--instant", action="store_true",
                        help="no rspamd: a stand-in that answers at once (the plugin's own cost)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rspamd-bench-") as tmp:
        root = Path(tmp)
        (root / "rspamd").mkdir()
        rspamd = Instant() if args.instant else Rspamd(root / "rspamd", args.workers)
        servers = {}
        try:
            if not args.instant:
                started = time.monotonic()
                rspamd.start()
                print(f"rspamd up in {time.monotonic() - started:.1f}s")
            for name, plugins in (("without", {}), ("with", {"rspamd": {"url": rspamd.url}})):
                servers[name] = start_subprocess(
                    server_config(root / name, {**LOCAL, "plugins": plugins}), root / name)
            for server in servers.values():  # warm up (imports, rspamd's first task)
                run(server, 5, 1)
            best = dict.fromkeys(servers, 0.0)
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    rate = run(server, args.messages, args.clients)
                    best[name] = max(best[name], rate)
                    print(f"round {round_ + 1}: {name:7} rspamd: {rate:7.1f} msg/s")
            cost_ms = 1000 / best["with"] - 1000 / best["without"]
            print(f"best of {args.rounds}, {args.messages} messages of 2 KB, {args.clients} "
                  f"client(s): without {best['without']:.1f} msg/s, with {best['with']:.1f} "
                  f"msg/s ({cost_ms * args.clients:+.2f} ms per message per connection)")
            delivered = len(list((root / "with" / "mail").glob("*/*/new/*")))
            tagged = sum(b"X-Spam-Action: no action" in p.read_bytes()
                         for p in (root / "with" / "mail").glob("*/*/new/*"))
            print(f"with rspamd: {delivered} delivered, {tagged} carry X-Spam-Action: no action")
            if args.instant:
                return
            scans = [float(t) for t in re.findall(
                r"rspamd_task_write_log: .* time: ([0-9.]+)ms",
                (root / "rspamd" / "rspamd.log").read_text(errors="replace"))]
            print(f"rspamd's own time per scan (its log, {len(scans)} scans): "
                  f"mean {statistics.mean(scans):.1f} ms, median {statistics.median(scans):.1f} ms")
        finally:
            for server in servers.values():
                server.stop()
            rspamd.close() if args.instant else rspamd.stop()


if __name__ == "__main__":
    main()
