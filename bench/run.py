"""Benchmark ingress against a bare aiosmtpd server and the load generator's ceiling.

    python bench/run.py --quick          # a couple of minutes
    python bench/run.py                  # the full run (see bench/README.md)

Every run starts its server afresh on 127.0.0.1 with an empty Maildir, drives it with one client
and one workload, stops it, and checks that the Maildir holds exactly the acknowledged messages.
Servers: ``ingress`` (every builtin plugin, durable Maildir delivery), ``ingress-2w`` (the same
with ``server.workers = 2``), ``baseline`` (bench/baseline.py: bare aiosmtpd writing the same
Maildir with the same fsyncs), ``sink`` (Postfix smtp-sink: stores nothing; the ceiling of the
client on this machine), and the peer users compare us with: ``haraka`` (Haraka with one worker
process, ``nodes=1``) and ``haraka-2n`` (``nodes=2``), both discarding what they accept
(bench/haraka.py installs and configures them); and ``ingress-pair``: two independent
one-process ingress servers on two ports, each driven by its own smtp-source with half the
sessions, with nothing shared (no common port, Maildir, metrics or tables): what two ingress
processes get out of this machine, the bound for ``ingress-2w``. Clients: ``smtp-source``
(Postfix) and ``asyncio`` (bench/client.py). Every run also measures the server's CPU time
per message (user plus system time of its whole process tree over the client's run, divided by
the acknowledged messages) and the share of all CPUs busy meanwhile (``machine busy``: the
server, the client and the kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
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
import haraka

HERE = Path(__file__).resolve().parent
SMTP_SOURCE = common.SMTP_SOURCE
SMTP_SINK = "/usr/sbin/smtp-sink"
DOMAIN = "bench.test"
USERS = 4
SERVERS = ("ingress", "ingress-2w", "baseline", "sink", "haraka", "haraka-2n", "ingress-before",
           "ingress-pair")
# the interpreter of another installation of ingress (--before), run as server ingress-before
BEFORE_PYTHON: str | None = None
# what the table compares each ingress row with (msgs/s and CPU per message)
PEERS = {"ingress": "haraka", "ingress-2w": "haraka-2n"}
CLIENTS = ("smtp-source", "asyncio")
RUN_TIMEOUT = 600  # seconds for one client run: a hung server fails the run, never the harness

# --quick and the full run; each option below overrides its part.
PRESETS = {
    "quick": {"messages": {2048: 400, 102400: 150}, "repeat": 1, "big_mb": 20},
    "full": {"messages": {2048: 3000, 102400: 800}, "repeat": 3, "big_mb": 200},
}


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_peak_rss(pid: int) -> None:
    """Start the peak RSS count afresh for *pid* and its descendants, so that it covers the
    load, not start-up (ingress computes a 64 MiB argon2 hash at start, then frees it)."""
    for p in common.process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_kb(pid: int) -> int:
    """Peak resident set (VmHWM) of *pid* plus its descendants, in KiB: an upper bound of what
    the server held at once."""
    total = 0
    for p in common.process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) CPU time of the machine so far, in ticks, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[3] + fields[4]


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all CPUs busy between two :func:`cpu_times` readings."""
    return 1 - (after[1] - before[1]) / max(after[0] - before[0], 1)


def cpu_busy(seconds: float = 0.5) -> float:
    """Share of all CPUs busy during *seconds*. Measured while the harness only sleeps, it is
    the load of other programs."""
    before = cpu_times()
    time.sleep(seconds)
    return busy_between(before, cpu_times())


def wait_quiet(below: float | None, patience: float) -> float:
    """Wait, up to *patience* seconds, until other programs use less than *below* of the CPUs;
    return the share measured last."""
    deadline = time.monotonic() + patience
    while True:
        busy = cpu_busy()
        if below is None or busy < below or time.monotonic() > deadline:
            return busy
        time.sleep(2)


# --- servers ------------------------------------------------------------------------------------


class Server:
    def __init__(self, kind: str, workdir: Path, uvloop: bool):
        self.kind = kind
        self.workdir = workdir
        self.maildir = workdir / "mail"
        self.uvloop = uvloop
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log = workdir / f"{kind}.log"
        self.parts: list[Server] = []  # ingress-pair: its two servers

    @property
    def ports(self) -> list[int]:
        return [part.port for part in self.parts] or [self.port]

    def _spawn(self, argv: list[str], ready_prefix: str | None) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                            cwd=self.workdir)
        if ready_prefix is None:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                raise RuntimeError(f"{self.kind} exited before it was ready:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            # "ingress: listening on 127.0.0.1:2525 (smtp)", "baseline: listening on ..."
            if line.startswith(ready_prefix) and "(metrics)" not in line:
                self.port = int(line.split()[3].rpartition(":")[2])
                return
        raise RuntimeError(f"{self.kind} did not get ready in 60s")

    def start(self) -> None:
        if self.kind == "ingress-pair":
            self.parts = [Server("ingress", self.workdir / half, self.uvloop) for half in "ab"]
            for part in self.parts:
                part.start()
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.maildir.mkdir()
        no_uvloop = [] if self.uvloop else ["--no-uvloop"]
        if self.kind.startswith("ingress"):
            workers = 2 if self.kind == "ingress-2w" else 1
            python = BEFORE_PYTHON if self.kind == "ingress-before" else sys.executable
            config = {
                "server": {"hostname": DOMAIN, "listen": ["127.0.0.1:0"], "workers": workers,
                           "drain_seconds": 5},
                "directory": {"domains": [DOMAIN], "users": [
                    {"address": f"user{i}@{DOMAIN}", "password": f"pw{i}"}
                    for i in range(USERS)]},
                "delivery": {"maildir": str(self.maildir), "queue": str(self.workdir / "queue")},
                # every session comes from 127.0.0.1: no limit per client address
                "plugins": {"max_connections": {"per_ip": 0}},
            }
            path = self.workdir / "ingress.json"
            path.write_text(json.dumps(config, indent=1))
            self._spawn([python, "-m", "ingress", "serve", "--config", str(path),
                         *no_uvloop], "ingress: listening on")
        elif self.kind == "baseline":
            self._spawn([sys.executable, str(HERE / "baseline.py"), "--maildir",
                         str(self.maildir), "--domain", DOMAIN, "--users", str(USERS),
                         *no_uvloop], "baseline:")
        elif self.kind.startswith("haraka"):
            self.port = free_port()
            home = self.workdir / "haraka"
            haraka.configure(home, self.port, 2 if self.kind == "haraka-2n" else 1, DOMAIN)
            argv, env = haraka.command(home)
            with open(self.log, "wb") as log:
                self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.workdir, env=env)
            wait_connectable(self.port, self.process)
        elif self.kind == "sink":
            self.port = free_port()
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            self._spawn([SMTP_SINK, *user, "-m", "1024", f"127.0.0.1:{self.port}", "1024"], None)
            wait_connectable(self.port, self.process)
        else:
            raise ValueError(self.kind)

    def reset_peak_rss(self) -> None:
        for part in self.parts or [self]:
            reset_peak_rss(part.process.pid)

    def peak_rss_kb(self) -> int:
        return sum(peak_rss_kb(part.process.pid) for part in self.parts or [self])

    def stop(self) -> None:
        if self.parts:
            try:
                self.parts[0].stop()
            finally:
                for part in self.parts[1:]:
                    part.stop()
        if self.process is None or self.process.poll() is not None:
            return
        common.stop(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def cpu_seconds(self) -> float:
        return sum(common.tree_cpu_seconds(part.process.pid) for part in self.parts or [self])

    def stored(self) -> int | None:
        if self.kind == "sink" or self.kind.startswith("haraka"):
            return None
        if self.parts:
            return sum(part.stored() for part in self.parts)
        return sum(1 for _ in self.maildir.glob("*/*/new/*"))


def wait_connectable(port: int, process: subprocess.Popen) -> None:
    for _ in range(600):  # bounded: 30 s
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                s.sendall(b"QUIT\r\n")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args[0]} did not accept connections")


# --- clients ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    size: int
    mode: str  # "one" message per connection, or "many"
    sessions: int
    messages: int

    @property
    def label(self) -> str:
        per = "1/conn" if self.mode == "one" else "n/conn"
        return f"{self.size // 1024}KB {per} x{self.sessions}"


def smtp_source_runs(ports: list[int], work: Workload) -> list[tuple[int, dict]]:
    """smtp-source against each port at once, the sessions and messages shared out evenly;
    (messages asked for, result) per port."""
    n = len(ports)
    if work.sessions < n:
        raise ValueError(f"{work.sessions} session(s) cannot be shared out over {n} servers")
    shares = [(work.sessions // n + (i < work.sessions % n),
               work.messages // n + (i < work.messages % n)) for i in range(n)]
    runs: list[tuple[int, dict]] = [(messages, {}) for _, messages in shares]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        sessions, messages = shares[i]
        try:
            runs[i][1].update(common.smtp_source(
                ports[i], sessions=sessions, messages=messages, size=work.size,
                to=f"user0@{DOMAIN}", many=work.mode == "many", timeout=RUN_TIMEOUT))
        except BaseException as exc:  # noqa: BLE001 - raised below, in the harness's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return runs


def run_client(client: str, ports: list[int], work: Workload, workdir: Path,
               uvloop: bool) -> dict:
    if client == "smtp-source":
        runs = smtp_source_runs(ports, work)
        acked = sum(done["acked"] for _, done in runs)
        elapsed = max(done["elapsed"] for _, done in runs)
        # smtp-source stops at the first unexpected reply; what it counted was acknowledged.
        failed = sum(asked - done["acked"] for asked, done in runs if done["returncode"])
        errors = {done["stderr"][-200:]: 1 for _, done in runs if done["returncode"]}
        return {"acked": acked, "failed": failed, "elapsed": elapsed,
                "rate": acked / elapsed, "p50_ms": None, "p99_ms": None, "errors": errors}
    if len(ports) > 1:
        raise ValueError("the asyncio client drives one port")
    port = ports[0]
    acked_file = workdir / "acked.txt"
    argv = [sys.executable, str(HERE / "client.py"), "--port", str(port),
            "--messages", str(work.messages), "--sessions", str(work.sessions),
            "--size", str(work.size), "--mode", work.mode, "--domain", DOMAIN,
            "--users", str(USERS), "--acked", str(acked_file),
            *([] if uvloop else ["--no-uvloop"])]
    done = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"client failed: {done.stderr.decode(errors='replace')[-2000:]}")
    result = json.loads(done.stdout)
    result["acked_seqs"] = [int(x) for x in acked_file.read_text().split()]
    return result


def verify(server: Server, result: dict) -> str:
    """'ok' when the Maildir holds exactly the acknowledged messages, else what is wrong."""
    stored = server.stored()
    if stored is None:
        return "-"
    problems = []
    if stored != result["acked"]:
        problems.append(f"{stored} stored != {result['acked']} acked")
    seqs = result.get("acked_seqs")
    if seqs is not None:  # our client numbers its messages: check which ones are there
        found = []
        for path in server.maildir.glob("*/*/new/*"):
            with open(path, "rb") as f:
                head = f.read(4096)
            at = head.find(b"X-Bench-Seq: ")
            if at >= 0:
                found.append(int(head[at + 13:at + 20]))
        if sorted(found) != sorted(seqs):
            dup = len(found) - len(set(found))
            problems.append(f"stored messages differ from acked ones ({dup} duplicated)")
    return "; ".join(problems) or "ok"


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    client: str
    workload: str
    server: str
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    rss_mb: float
    cpu_us: float | None  # server CPU time per acknowledged message, microseconds
    acked: int
    failed: int
    check: str
    runs: int
    busy: float  # other programs' share of the CPUs just before the runs (median)
    machine: float | None  # share of all CPUs busy during the runs: server, client, kernel


def one_run(kind: str, client: str, work: Workload, root: Path, uvloop: bool,
            quiet: tuple[float | None, float] = (None, 0)) -> dict:
    busy = wait_quiet(*quiet)
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))
    server = Server(kind, workdir, uvloop)
    try:
        server.start()
        server.reset_peak_rss()
        cpu_before = server.cpu_seconds()
        times = cpu_times()
        result = run_client(client, server.ports, work, workdir, uvloop)
        result["machine"] = busy_between(times, cpu_times())
        cpu = server.cpu_seconds() - cpu_before
        result["cpu_us"] = 1e6 * cpu / result["acked"] if result["acked"] else None
        result["rss_kb"] = server.peak_rss_kb()
        result["busy"] = busy
    finally:
        server.stop()
    result["check"] = verify(server, result)
    if result["check"] not in ("ok", "-"):
        print(f"  !! {kind} {client} {work.label}: {result['check']}", file=sys.stderr)
    # The Maildir stays until the whole benchmark ends: right after many deletions, ext4 makes
    # creating files nearby several times dearer (it skips recently freed inodes), which would
    # charge the next run for this one's cleanup.
    return result


def median_row(kind: str, client: str, work: Workload, results: list[dict]) -> Row:
    def med(key):
        values = [r[key] for r in results if r.get(key) is not None]
        return statistics.median(values) if values else None

    checks = sorted({r["check"] for r in results})
    return Row(client, work.label, kind, med("rate"), med("p50_ms"), med("p99_ms"),
               med("rss_kb") / 1024, med("cpu_us"), sum(r["acked"] for r in results),
               sum(r["failed"] for r in results), ", ".join(checks), len(results),
               med("busy"), med("machine"))


def big_message(kind: str, megabytes: int, root: Path, uvloop: bool) -> dict:
    work = Workload(megabytes << 20, "one", 1, 1)
    return one_run(kind, "asyncio", work, root, uvloop)


def fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(row: Row, other: Row | None, key: str = "rate") -> str:
    if other is None or not row.server.startswith("ingress"):
        return ""
    mine, theirs = getattr(row, key), getattr(other, key)
    return f"{mine / theirs:.2f}" if mine and theirs else ""


def table(rows: list[Row]) -> str:
    by = {(r.client, r.workload, r.server): r for r in rows}
    head = ("| client | workload | server | msgs/s | p50 ms | p99 ms | CPU µs/msg | peak RSS MB | "
            "acked | failed | stored = acked | vs baseline | vs ceiling | vs 1 worker | "
            "vs Haraka | CPU vs Haraka | machine busy | other load |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        single = by.get((r.client, r.workload, "ingress")) if r.server in (
            "ingress-2w", "ingress-pair") else None
        peer = by.get((r.client, r.workload, PEERS.get(r.server, "")))
        out.append(
            f"| {r.client} | {r.workload} | {r.server} | {fmt(r.rate)} | {fmt(r.p50_ms, 1)} | "
            f"{fmt(r.p99_ms, 1)} | {fmt(r.cpu_us)} | {fmt(r.rss_mb, 1)} | {r.acked} | "
            f"{r.failed} | {r.check} | "
            f"{ratio(r, by.get((r.client, r.workload, 'baseline')))} | "
            f"{ratio(r, by.get((r.client, r.workload, 'sink')))} | {ratio(r, single)} | "
            f"{ratio(r, peer)} | {ratio(r, peer, 'cpu_us')} | "
            f"{'-' if r.machine is None else format(r.machine, '.0%')} | {r.busy:.0%} |")
    return "\n".join(out)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows: list[Row]) -> str:
    by = {(r.client, r.workload, r.server): r for r in rows}
    pairs = {"ingress / baseline": ("ingress", "baseline", "rate"),
             "ingress / ceiling (smtp-sink)": ("ingress", "sink", "rate"),
             "ingress 2 workers / ingress": ("ingress-2w", "ingress", "rate"),
             "two independent ingress processes / ingress": ("ingress-pair", "ingress", "rate"),
             "ingress 2 workers / two independent processes": ("ingress-2w", "ingress-pair",
                                                               "rate"),
             "ingress / ingress before (--before)": ("ingress", "ingress-before", "rate"),
             "CPU per message: ingress / ingress before": ("ingress", "ingress-before", "cpu_us"),
             "ingress 2 workers / baseline": ("ingress-2w", "baseline", "rate"),
             "ingress / Haraka nodes=1": ("ingress", "haraka", "rate"),
             "ingress 2 workers / Haraka nodes=2": ("ingress-2w", "haraka-2n", "rate"),
             "CPU per message: ingress / Haraka nodes=1": ("ingress", "haraka", "cpu_us"),
             "CPU per message: ingress 2 workers / Haraka nodes=2":
                 ("ingress-2w", "haraka-2n", "cpu_us")}
    out = ["| ratio (geometric mean over workloads) | smtp-source | asyncio | all | min | max |",
           "|---|---|---|---|---|---|"]
    for label, (a, b, key) in pairs.items():
        cells, every = [], []
        for client in CLIENTS:
            ratios = [getattr(by[(c, w, a)], key) / getattr(by[(c, w, b)], key)
                      for (c, w, s) in by if c == client and s == a and (c, w, b) in by
                      and getattr(by[(c, w, a)], key) and getattr(by[(c, w, b)], key)]
            every += ratios
            cells.append(fmt(geomean(ratios), 2))
        if every:
            out.append(f"| {label} | {' | '.join(cells)} | {fmt(geomean(every), 2)} | "
                       f"{min(every):.2f} | {max(every):.2f} |")
    return "\n".join(out)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPU(s) {cpu}, "
            f"Python {platform.python_version()}, "
            f"{'uvloop' if uvloop_installed() else 'asyncio'} event loop, load average {load}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts, one repetition")
    p.add_argument("--servers", default=",".join(s for s in SERVERS
                                                 if s not in ("ingress-before", "ingress-pair")),
                   help="comma-separated subset; ingress-before with --before; ingress-pair "
                        "runs with the smtp-source client only")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    p.add_argument("--sizes", default="2048,102400", help="message sizes in bytes")
    p.add_argument("--modes", default="one,many", help="messages per connection: one, many")
    p.add_argument("--sessions", default="16,128", help="concurrent sessions")
    p.add_argument("--messages", type=int, help="messages per run (default: by size and preset)")
    p.add_argument("--repeat", type=int, help="runs per cell; the table shows medians")
    p.add_argument("--big-mb", type=int, help="one message this large to ingress, for peak "
                   "RSS (0: skip)")
    p.add_argument("--no-uvloop", action="store_true", help="asyncio's loop everywhere")
    p.add_argument("--before", metavar="PYTHON",
                   help="the interpreter of another ingress installation (say the code before a "
                        "change, in a venv of its own): server ingress-before, one process")
    p.add_argument("--quiet", type=float, metavar="SHARE",
                   help="before each run, wait until other programs use less than this share "
                        "of the CPUs (e.g. 0.15), for at most --patience seconds")
    p.add_argument("--patience", type=float, default=120, metavar="SECONDS")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    p.add_argument("--report", metavar="FILE", help="also write the tables, the machine and "
                   "the load averages as Markdown")
    p.add_argument("--workdir", metavar="DIR",
                   help="where Maildirs go (default: a temporary folder on the disk of the "
                        "current directory; not tmpfs, where fsync is free)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    servers = [s for s in args.servers.split(",") if s]
    global BEFORE_PYTHON
    BEFORE_PYTHON = args.before
    if "ingress-before" in servers and not args.before:
        raise SystemExit("server ingress-before needs --before PYTHON")
    clients = [c for c in args.clients.split(",") if c]
    for name in servers:
        if name not in SERVERS:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    for name in clients:
        if name not in CLIENTS:
            raise SystemExit(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}")
    if "ingress-pair" in servers and "smtp-source" not in clients:
        raise SystemExit("server ingress-pair runs with the smtp-source client only")
    needed = [SMTP_SOURCE] * ("smtp-source" in clients) + [SMTP_SINK] * ("sink" in servers)
    for tool in needed:
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} is not installed (Debian/Ubuntu: apt-get install postfix)")
    repeat = args.repeat or preset["repeat"]
    big_mb = preset["big_mb"] if args.big_mb is None else args.big_mb
    uvloop = uvloop_installed() and not args.no_uvloop
    works = [  # an empty list (--sizes "") skips the grid: only the big message
        Workload(size, mode, sessions, args.messages or preset["messages"].get(size, 400))
        for size in [int(x) for x in args.sizes.split(",") if x]
        for mode in [x for x in args.modes.split(",") if x]
        for sessions in [int(x) for x in args.sessions.split(",") if x]
    ]
    root = Path(tempfile.mkdtemp(prefix="ingress-bench-", dir=args.workdir or os.getcwd()))
    started = f"machine: {machine()}"
    print(started, flush=True)
    rows: list[Row] = []
    raw: list[dict] = []
    try:
        for client in clients:
            # ingress-pair splits the sessions between two smtp-source processes
            kinds = [s for s in servers if s != "ingress-pair" or client == "smtp-source"]
            for work in works:
                results: dict[str, list[dict]] = {s: [] for s in kinds}
                for _ in range(repeat):  # servers interleaved, so load changes hit all alike
                    for kind in kinds:
                        result = one_run(kind, client, work, root, uvloop,
                                         (args.quiet, args.patience))
                        results[kind].append(result)
                        raw.append({"client": client, "workload": dataclasses.asdict(work),
                                    "server": kind, **{k: v for k, v in result.items()
                                                       if k != "acked_seqs"}})
                for kind in kinds:
                    row = median_row(kind, client, work, results[kind])
                    rows.append(row)
                    print(f"  {client:11} {work.label:16} {kind:10} {row.rate:8.0f} msgs/s  "
                          f"p50 {fmt(row.p50_ms, 1):>6} ms  p99 {fmt(row.p99_ms, 1):>6} ms  "
                          f"RSS {row.rss_mb:6.1f} MB  {row.check}", flush=True)
        big = []
        if big_mb:
            for kind in [s for s in ("ingress", "baseline") if s in servers]:
                result = big_message(kind, big_mb, root, uvloop)
                big.append((kind, result))
                raw.append({"big_mb": big_mb, "server": kind,
                            **{k: v for k, v in result.items() if k != "acked_seqs"}})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = [started, "command: " + " ".join(["bench/run.py", *(argv or sys.argv[1:])])]
    if rows:
        report += ["", table(rows), "", summary(rows)]
    if big:
        report += ["", f"| one {big_mb} MB message | peak RSS MB | seconds | stored = acked |",
                   "|---|---|---|---|"]
        report += [f"| {kind} | {r['rss_kb'] / 1024:.1f} | {r['elapsed']:.1f} | {r['check']} |"
                   for kind, r in big]
    busy = sorted(r["busy"] for r in raw if "busy" in r)
    if busy:
        report.append(f"\nother programs' share of the CPUs just before each run: median "
                      f"{statistics.median(busy):.0%}, max {busy[-1]:.0%} ({len(busy)} runs)")
    report.append(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(report[2:]))
    if args.report:
        Path(args.report).write_text("\n".join(report) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": raw}, indent=1))
    bad = [r for r in rows if r.check not in ("ok", "-") or r.failed]
    bad += [r for _, r in big if r["check"] != "ok" or r["failed"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
