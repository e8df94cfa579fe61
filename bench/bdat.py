"""BDAT against DATA on the same ingress, same run: msgs/s and server CPU per message.

    python bench/bdat.py                      # 2 KB and 100 KB, 16 sessions, 5 rounds
    python bench/bdat.py --rounds 3 --report RESULTS-bdat.md

Each round starts ingress afresh (every builtin plugin, durable Maildir delivery: run.py's
``ingress`` server) once per size and command, DATA and BDAT interleaved so that a change in
machine load hits both alike, and drives it with bench/client.py: ``--mode many`` (each session
sends messages until the count is used up), MAIL/RCPT/DATA pipelined, or MAIL/RCPT/``BDAT <n>
LAST`` and the message in one write. Every run checks that the Maildir holds exactly the
acknowledged messages. The table shows medians and the BDAT/DATA ratio per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import run

HERE = Path(__file__).resolve().parent


def one(command: str, size: int, args, root: Path, uvloop: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{command}-", dir=root))
    server = run.Server("ingress", workdir, uvloop)
    acked_file = workdir / "acked.txt"
    try:
        server.start()
        cpu_before = server.cpu_seconds()
        argv = [sys.executable, str(HERE / "client.py"), "--port", str(server.port),
                "--messages", str(args.messages[size]), "--sessions", str(args.sessions),
                "--size", str(size), "--mode", "many", "--command", command,
                "--domain", run.DOMAIN, "--users", str(run.USERS), "--acked", str(acked_file),
                *([] if uvloop else ["--no-uvloop"])]
        done = subprocess.run(argv, capture_output=True, timeout=run.RUN_TIMEOUT)
        if done.returncode:
            raise RuntimeError(done.stderr.decode(errors="replace")[-2000:])
        result = json.loads(done.stdout)
        cpu = server.cpu_seconds() - cpu_before
        result["cpu_us"] = 1e6 * cpu / result["acked"] if result["acked"] else None
        result["acked_seqs"] = [int(x) for x in acked_file.read_text().split()]
    finally:
        server.stop()
    result["check"] = run.verify(server, result)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--sizes", default="2048,102400")
    p.add_argument("--messages-small", type=int, default=3000, help="per run, 2 KB messages")
    p.add_argument("--messages-large", type=int, default=800, help="per run, larger ones")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--report", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--workdir", metavar="DIR", help="where Maildirs go (not tmpfs)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    args.messages = {s: args.messages_small if s <= 4096 else args.messages_large for s in sizes}
    uvloop = run.uvloop_installed() and not args.no_uvloop
    root = Path(tempfile.mkdtemp(prefix="ingress-bdat-", dir=args.workdir or os.getcwd()))
    results: dict[tuple[int, str], list[dict]] = {}
    machine = f"machine: {run.machine()}"
    print(machine, flush=True)
    failed = False
    try:
        for round_ in range(args.rounds):
            for size in sizes:
                for command in ("data", "bdat"):
                    r = one(command, size, args, root, uvloop)
                    results.setdefault((size, command), []).append(r)
                    failed |= r["check"] != "ok" or r["failed"] > 0
                    print(f"  round {round_ + 1} {size // 1024:4d} KB {command:4} "
                          f"{r['rate']:8.0f} msgs/s  CPU {r['cpu_us'] or 0:6.0f} us/msg  "
                          f"{r['check']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [machine, f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
             "command: " + " ".join(["bench/bdat.py", *(argv or sys.argv[1:])]), "",
             "| size | command | msgs/s (median) | CPU µs/msg (median) | acked | failed | "
             "stored = acked | BDAT/DATA msgs/s by round (median) | "
             "BDAT/DATA CPU per msg by round (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        data, bdat = results[(size, "data")], results[(size, "bdat")]
        for command, rs in (("DATA", data), ("BDAT", bdat)):
            extra = ""
            if command == "BDAT":
                pairs = list(zip(bdat, data, strict=True))
                for key in ("rate", "cpu_us"):
                    ratios = [b[key] / d[key] for b, d in pairs if b[key] and d[key]]
                    median = f"{statistics.median(ratios):.2f}" if ratios else "-"
                    extra += f" {' '.join(f'{x:.2f}' for x in ratios)} (**{median}**) |"
            else:
                extra = " | |"
            checks = ", ".join(sorted({r["check"] for r in rs}))
            lines.append(
                f"| {size // 1024} KB | {command} | {statistics.median(r['rate'] for r in rs):.0f}"
                f" | {statistics.median(r['cpu_us'] or 0 for r in rs):.0f} | "
                f"{sum(r['acked'] for r in rs)} | {sum(r['failed'] for r in rs)} | {checks} |"
                + extra)
    text = "\n".join(lines)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
