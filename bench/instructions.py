"""Instructions per message: the server under valgrind's callgrind, which counts the machine
instructions it executes rather than seconds, so the figure is the same whatever else the
machine is doing (two runs of the same code differ by well under 0.1 %). For comparing code
changes on a busy machine; seconds and CPU time stay with bench/run.py and bench/ab.py.

Each case runs the server twice, for a small and a large number of messages (Postfix
``smtp-source``, 2 KB by default, one or many messages per connection), and reports
(instructions of the large run - those of the small one) / (the difference in messages): what
one more message costs, start-up and shutdown cancelled out. Every thread of the server
process counts (the event loop, delivery and hash threads).

    python bench/instructions.py                           # this checkout's ingress
    python bench/instructions.py --python A/bin/python --python B/bin/python   # A vs B

valgrind slows Python down some fifty times: the default counts take a few minutes per
installation. Needs ``valgrind`` and ``smtp-source`` (Debian packages valgrind, postfix).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import smtp_source, start_ingress, stop  # noqa: E402

DOMAIN = "bench.test"
TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def count(python: str, messages: int, mode: str, size: int, sessions: int,
          workdir: Path) -> tuple[int, int]:
    """(instructions of the server process, messages stored) for one run."""
    run = Path(tempfile.mkdtemp(prefix="run-", dir=workdir)).resolve()
    config = {
        "server": {"hostname": DOMAIN, "listen": ["127.0.0.1:0"], "drain_seconds": 5},
        "directory": {"domains": [DOMAIN], "domain_settings": {DOMAIN: {"catch_all": True}}},
        "delivery": {"maildir": str(run / "mail"), "queue": str(run / "queue")},
        "plugins": {"max_connections": {"per_ip": 0}},  # every session comes from 127.0.0.1
    }
    out = run / "callgrind.out"
    process, port = start_ingress(
        config, run, python=python, timeout=600,
        prefix=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    try:
        result = smtp_source(port, sessions=sessions, messages=messages, size=size,
                             to=f"user@{DOMAIN}", many=mode == "many")
    finally:
        stop(process, grace=120)
    stored = len(list((run / "mail" / DOMAIN / "user" / "new").iterdir()))
    found = TOTALS.search(out.read_bytes())
    if found is None or result["acked"] != messages or stored != messages:
        raise SystemExit(f"{python}: run of {messages} failed: acked {result['acked']}, stored "
                         f"{stored}, {result['stderr']}")
    shutil.rmtree(run)
    return int(found[1]), stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append",
                        help="the interpreter of an installation to measure (repeatable); "
                             "default: this one")
    parser.add_argument("--modes", default="many,one", help="messages per connection")
    parser.add_argument("--small", type=int, default=50, help="messages of the small run")
    parser.add_argument("--large", type=int, default=550, help="messages of the large run")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian package valgrind)")
    pythons = args.python or [sys.executable]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ingress-instr-", dir=".") as tmp:
        for mode in args.modes.split(","):
            for python in pythons:
                small, _ = count(python, args.small, mode, args.size, args.sessions, Path(tmp))
                large, _ = count(python, args.large, mode, args.size, args.sessions, Path(tmp))
                per = (large - small) / (args.large - args.small)
                rows.append((mode, python, per))
                print(f"{mode:4} {python}: {per / 1e6:.3f} M instructions per message",
                      flush=True)
    print(f"\nsmtp-source -s {args.sessions} -l {args.size}, ({args.large} - {args.small}) "
          "messages; instructions per message (callgrind, the server's process):")
    print("| messages per connection | installation | M instructions / message | vs first |")
    print("|---|---|---|---|")
    for mode, python, per in rows:
        first = next(p for m, _, p in rows if m == mode)
        print(f"| {mode} | {python} | {per / 1e6:.3f} | {per / first:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
