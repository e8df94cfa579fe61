"""What the PROXY protocol header costs per connection.

One ``ingress serve`` (Maildir delivery, ``server.proxy_protocol = ["127.0.0.2"]``) and two real
HAProxy instances in front of it, in TCP mode, identical but for the server line:

- ``plain``: plain TCP proxying, HAProxy connects from 127.0.0.3 (not a trusted proxy);
- ``proxy-v2``: ``send-proxy-v2``, HAProxy connects from 127.0.0.2 (trusted: header required);
- ``direct`` (reference): the client connects to ingress itself, no HAProxy.

Postfix's ``smtp-source`` sends one message per connection (the case where a per-connection cost
shows most); the variants take turns within each round, so a change in machine load hits all of
them alike. Prints msgs/s and the CPU time ingress spent per message (user + system, from
/proc; on a busy machine steadier than a rate) per round, medians and the proxy-v2/plain ratios,
and checks that the Maildir holds exactly the acknowledged messages::

    python bench/proxy.py                          # -s 16 -m 2000 -l 2048, 5 rounds
    python bench/proxy.py --rounds 1 --messages 200  # quick look
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from run import wait_quiet

from ingress import proxy
from ingress.testing import HAProxy

DOMAIN = "bench.test"
TRUSTED, UNTRUSTED = "127.0.0.2", "127.0.0.3"
VARIANTS = ("plain", "proxy-v2", "direct")
RUN_TIMEOUT = 600


def start_ingress(workdir: Path, uvloop: bool) -> tuple[subprocess.Popen, int]:
    config = {
        "server": {"hostname": DOMAIN, "listen": ["127.0.0.1:0"], "drain_seconds": 5,
                   "proxy_protocol": [TRUSTED]},
        "directory": {"domains": [DOMAIN],
                      "users": [{"address": f"user0@{DOMAIN}", "password": "pw"}]},
        "delivery": {"maildir": str(workdir / "mail"), "queue": str(workdir / "queue")},
    }
    return common.start_ingress(config, workdir, args=() if uvloop else ("--no-uvloop",))


def smtp_source(port: int, sessions: int, messages: int, size: int) -> dict:
    done = common.smtp_source(port, sessions=sessions, messages=messages, size=size,
                              to=f"user0@{DOMAIN}", timeout=RUN_TIMEOUT)
    if done["returncode"]:
        print(f"  smtp-source failed: {done['stderr']}")
    return {"acked": done["acked"], "rate": done["acked"] / done["elapsed"],
            "ok": done["returncode"] == 0}


HEADERS = {
    "v1": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    "v2": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 198, 51, 100, 1])
          + (40000).to_bytes(2, "big") + (25).to_bytes(2, "big"),
}


async def header_cost(count: int) -> dict[str, float]:
    """Microseconds ingress spends reading and parsing one header that is already in the
    socket (median of batches), over socketpairs: the header's own cost, without HAProxy."""
    import socket

    costs = {}
    for name, header in HEADERS.items():
        batches = []
        for _ in range(5):
            spent = 0.0
            for _ in range(count // 5):
                ours, theirs = socket.socketpair()
                ours.setblocking(False)
                theirs.sendall(header + b"EHLO x\r\n")
                started = time.perf_counter()
                assert await proxy.read_header(ours, 5) == ("192.0.2.7", 40000)
                spent += time.perf_counter() - started
                ours.close()
                theirs.close()
            batches.append(spent / (count // 5) * 1e6)
        costs[name] = statistics.median(batches)
    return costs


def ratio(a: float, b: float) -> float:
    """a / b; nan when b is 0 (a tiny run can take less CPU than one clock tick shows)."""
    return a / b if b else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--messages", type=int, default=2000, help="per round and variant")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quiet", type=float, default=None,
                   help="wait before each run until other programs use less than this share "
                        "of the CPUs (e.g. 0.15)")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--workdir", default=".", help="where the temporary Maildir goes")
    p.add_argument("--headers", type=int, default=20000,
                   help="headers read in the micro-measurement (0: skip it)")
    args = p.parse_args()
    if args.headers:
        costs = common.run(header_cost(args.headers), uvloop=not args.no_uvloop)
        print("reading one header already in the socket: " + ", ".join(
            f"{name} {us:.1f} µs" for name, us in costs.items()), flush=True)

    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
    acked_total, failures = 0, 0
    with tempfile.TemporaryDirectory(prefix="bench-proxy-", dir=args.workdir) as tmp:
        workdir = Path(tmp).resolve()
        ingress, port = start_ingress(workdir, not args.no_uvloop)
        proxies = {
            "plain": HAProxy(workdir / "plain", [("127.0.0.1", port)], f"source {UNTRUSTED}"),
            "proxy-v2": HAProxy(workdir / "v2", [("127.0.0.1", port)],
                                f"send-proxy-v2 source {TRUSTED}"),
        }
        try:
            for haproxy in proxies.values():
                haproxy.start()
            ports = {name: h.port for name, h in proxies.items()} | {"direct": port}
            for round_ in range(1, args.rounds + 1):
                for variant in VARIANTS:
                    busy = wait_quiet(args.quiet, 120)
                    cpu0 = common.tree_cpu_seconds(ingress.pid)
                    result = smtp_source(ports[variant], args.sessions, args.messages,
                                         args.size)
                    cpu = common.tree_cpu_seconds(ingress.pid) - cpu0
                    cpu = cpu / max(result["acked"], 1) * 1e6
                    cpu_us[variant].append(cpu)
                    acked_total += result["acked"]
                    failures += not result["ok"]
                    rates[variant].append(result["rate"])
                    print(f"round {round_} {variant:9} {result['rate']:8.1f} msgs/s, ingress "
                          f"CPU {cpu:6.0f} us/msg ({result['acked']} acked, other load "
                          f"{busy:.0%})", flush=True)
        finally:
            for haproxy in proxies.values():
                haproxy.stop()
            common.stop(ingress)
            ingress.stdout.close()
        stored = sum(1 for _ in (workdir / "mail").glob("*/*/new/*"))
        log = (workdir / "ingress.log").read_text(errors="replace")

    medians = {v: statistics.median(r) for v, r in rates.items()}
    cpu_medians = {v: statistics.median(r) for v, r in cpu_us.items()}
    print()
    print(f"smtp-source -s {args.sessions} -m {args.messages} -l {args.size}, one message per "
          f"connection, {args.rounds} round(s); medians:")
    print("| variant | msgs/s | ingress CPU µs/msg | msgs/s per round |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {medians[v]:.1f} | {cpu_medians[v]:.0f} | "
              f"{', '.join(f'{r:.0f}' for r in rates[v])} |")
    per_round = [ratio(a, b) for a, b in zip(rates["proxy-v2"], rates["plain"], strict=True)]
    cpu_round = [ratio(a, b) for a, b in zip(cpu_us["proxy-v2"], cpu_us["plain"], strict=True)]
    print(f"\nproxy-v2 / plain, msgs/s: {ratio(medians['proxy-v2'], medians['plain']):.3f} "
          f"(per round {min(per_round):.3f}-{max(per_round):.3f}); ingress CPU per message: "
          f"{ratio(cpu_medians['proxy-v2'], cpu_medians['plain']):.3f} (per round "
          f"{min(cpu_round):.3f}-{max(cpu_round):.3f})")
    problems = []
    if stored != acked_total:
        problems.append(f"{stored} messages stored != {acked_total} acknowledged")
    if "connection from proxy" in log:
        problems.append("ingress refused a proxied connection (see its log)")
    if failures:
        problems.append(f"{failures} smtp-source run(s) failed")
    print("check:", "; ".join(problems) or f"ok ({stored} stored = acknowledged)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
