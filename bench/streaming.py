"""Streaming DATA, before and after: peak RSS while receiving one big message, and messages/s
for 100 KB messages, for servers that hold each message whole in memory ("before") and for
ingress as it is ("after"), all run the same way in the same run.

    python bench/streaming.py [--messages 1000] [--sessions 8] [--big-mb 200] [--repeat 5]
                              [--workdir DIR]     # prints a Markdown table at the end

Servers (each a subprocess, Maildir on the same disk, every message fsynced before its 250):

- ``aiosmtpd``: the baseline of bench/run.py, a bare aiosmtpd handler writing the same Maildir
  with the same fsyncs (bench/baseline.py);
- ``ingress-in-memory``: ingress with its spool threshold raised to 1 TB, so every message is
  kept in memory (bench/serve_in_memory.py);
- ``ingress``: ingress as it is (1 MB in memory, then the spool file);
- ``ingress-spool-all``: ingress with threshold 0, every message through a spool file.

Peak RSS: the server's high-water mark is reset after start-up (``/proc/<pid>/clear_refs``) and
read after the big message (VmHWM), with VmRSS sampled every 5 ms as a cross-check. The big
message is a MIME message with a base64 attachment, streamed by a raw socket client. Messages/s:
Postfix's ``smtp-source`` (``-s`` sessions, ``-m`` messages of 100 KB), median of the rounds;
each round runs every server once, in a rotating order.
Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
MB = 1 << 20
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def ingress_config(work: Path) -> Path:
    path = work / "ingress.json"
    path.write_text(json.dumps({
        "server": {"hostname": "mx.bench.test", "listen": ["127.0.0.1:0"]},
        "directory": {"domains": ["bench.test"],
                      "domain_settings": {"bench.test": {"catch_all": True}}},
        "delivery": {"maildir": str(work / "mail"), "queue": str(work / "queue")},
        "plugins": {"max_connections": {"per_ip": 0}},  # --sessions from 127.0.0.1 alone
    }))
    return path


def commands(work: Path) -> dict[str, list[str]]:
    py = sys.executable
    cfg = str(ingress_config(work))
    in_memory = str(HERE / "serve_in_memory.py")
    return {
        "aiosmtpd": [py, str(HERE / "baseline.py"), "--maildir", str(work / "mail"),
                     "--domain", "bench.test", "--users", "1"],
        "ingress-in-memory": [py, in_memory, str(1 << 40), "serve", "--config", cfg],
        "ingress": [py, "-m", "ingress", "serve", "--config", cfg],
        "ingress-spool-all": [py, in_memory, "0", "serve", "--config", cfg],
    }


class Server:
    def __init__(self, argv: list[str], work: Path):
        self.log = open(work / "server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log,
                                        cwd=work)
        line = self.process.stdout.readline().decode()
        found = READY.search(line)
        if not found:
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(found[1])
        self.pid = self.process.pid

    def field(self, name: str) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(rf"^{name}:\s+(\d+) kB", status, re.M)[1])

    def stop(self) -> None:
        common.stop(self.process)
        self.process.stdout.close()
        self.log.close()


def big_message(sock, size: int) -> tuple[bytes, float]:
    """Send one MIME message of about *size* bytes; (final reply, seconds)."""
    reader = sock.makefile("rb")

    def reply() -> bytes:
        while True:
            line = reader.readline()
            if line[3:4] != b"-":
                return line.strip()

    try:
        reply()
        for command in (b"EHLO bench.client", b"MAIL FROM:<sender@bench.test>",
                        b"RCPT TO:<user0@bench.test>", b"DATA"):
            sock.sendall(command + b"\r\n")
            reply()
        started = time.perf_counter()
        sock.sendall(b"From: sender@bench.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
                     b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\r\ntext\r\n"
                     b"--b\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n")
        block = (b"QUJD" * 19 + b"\r\n") * (MB // 78)
        for _ in range(-(-size // len(block))):
            sock.sendall(block)
        sock.sendall(b"--b--\r\n.\r\n")
        final = reply()
        elapsed = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
        reply()
        return final, elapsed
    finally:
        reader.close()


def peak_rss(server: Server, size: int) -> dict:
    samples = [server.field("VmRSS")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            samples.append(server.field("VmRSS"))

    try:
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        final, elapsed = big_message(sock, size)
    stop.set()
    thread.join()
    peak = max(samples)
    if reset:
        peak = max(peak, server.field("VmHWM"))
    return {"reply": final.decode(errors="replace"), "peak_kb": peak,
            "seconds": elapsed, "hwm_reset": reset}


def throughput(server: Server, messages: int, sessions: int, work: Path) -> float:
    tool = shutil.which("smtp-source") or shutil.which("smtp-source", path="/usr/sbin")
    before = count_messages(work)
    started = time.perf_counter()
    subprocess.run([tool, "-s", str(sessions), "-m", str(messages), "-l", "102400",
                    "-f", "sender@bench.test", "-t", "user0@bench.test",
                    f"127.0.0.1:{server.port}"], check=True)
    elapsed = time.perf_counter() - started
    stored = count_messages(work) - before
    if stored != messages:
        raise RuntimeError(f"{stored} of {messages} messages stored")
    return messages / elapsed


def count_messages(work: Path) -> int:
    new = work / "mail" / "bench.test" / "user0" / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def run(name: str, argv: list[str], work: Path, args, result: dict) -> None:
    """One round on one server: messages/s, and on the first round idle and peak RSS."""
    server = Server(argv, work)
    try:
        time.sleep(1)
        if not result:
            result.update(server=name, idle_kb=server.field("VmRSS"), rates=[])
            result.update(peak_rss(server, args.big_mb * MB))
            shutil.rmtree(work / "mail", ignore_errors=True)
        result["rates"].append(throughput(server, args.messages, args.sessions, work))
    finally:
        server.stop()
    shutil.rmtree(work / "mail", ignore_errors=True)
    result["rate"] = statistics.median(result["rates"])
    print(json.dumps(result), flush=True)


def report(results: list[dict], args) -> str:
    lines = [
        "| server | idle RSS | peak RSS, one "
        f"{args.big_mb} MB message | its transfer | 100 KB messages/s (median; runs) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        runs = ", ".join(f"{x:.0f}" for x in r["rates"])
        lines.append(f"| {r['server']} | {r['idle_kb'] / 1024:.1f} MB | "
                     f"{r['peak_kb'] / 1024:.1f} MB | {r['seconds']:.1f} s "
                     f"({args.big_mb / r['seconds']:.0f} MB/s), `{r['reply'][:12]}` | "
                     f"{r['rate']:.0f} ({runs}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="server names to run")
    parser.add_argument("--workdir", help="where the Maildirs go (a real disk, not tmpfs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingress-bench-", dir=args.workdir))
    servers = [(n, a) for n, a in commands(work).items() if not args.only or n in args.only]
    results: dict[str, dict] = {name: {} for name, _ in servers}
    try:
        # Rounds interleave the servers (in a rotating order), so that a busy moment of the
        # machine does not fall on one server only.
        for round_ in range(args.repeat):
            shift = round_ % len(servers)
            for name, argv in servers[shift:] + servers[:shift]:
                run(name, argv, work, args, results[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{platform.platform()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; {args.messages} messages x {args.repeat}, "
          f"{args.sessions} sessions")
    print(report(list(results.values()), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
