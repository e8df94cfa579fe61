"""Time and peak memory of ``ingress check-config`` on hostile config files.

    python bench/hostile_config.py                         # this checkout
    python bench/hostile_config.py --before /tmp/old-src   # and an older source tree, same run

``--before`` names a source tree (e.g. ``git archive <commit> | tar -x -C DIR``, plus the links
``DIR/ingress_schemas -> schemas`` and ``DIR/ingress_plugins -> plugins``) that is put first on
PYTHONPATH for the "before" runs. Every run is bounded: 120 s, 3 GB of address space.
Prints a Markdown table: exit status, wall time, peak RSS of the check-config process.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEEP = 100_000
BOMB = "x:\n" + "".join(
    f"  {name}: &{name} [{','.join([f'*{prev}'] * 9) if prev else ','.join(['lol'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
) + "server:\n  listen: *i\n"
FILES = {  # name: (what, content; None: a sparse 2 GB file)
    "bomb.yaml": ("YAML anchor bomb, 366 bytes", BOMB),
    "deep.json": ("100,000 nested JSON arrays", '{"a": ' + "[" * DEEP + "]" * DEEP + "}"),
    "deep.toml": ("100,000 nested TOML arrays", "a = " + "[" * DEEP + "]" * DEEP + "\n"),
    "deep.yaml": ("100,000 nested YAML flow mappings", "a: " + "{a: " * DEEP + "1" + "}" * DEEP),
    "dotted.toml": ("TOML key of 20,000 dotted parts (40 KB)", ".".join(["a"] * 20_000) + " = 1\n"),
    "nan.toml": ("session_timeout.minutes = nan", "[plugins.session_timeout]\nminutes = nan\n"),
    "port.toml": ("listen on port 96313", '[server]\nlisten = ["127.0.0.1:96313"]\n'),
    "metrics.toml": ('metrics_listen = "garbage"', '[server]\nmetrics_listen = "garbage"\n'),
    "bigint.json": ("a 5,000-digit integer", '{"a": ' + "9" * 5000 + "}"),
    "values.yaml": ("1 MiB YAML list of 500,000 ones", "a: [" + ",".join(["1"] * 524_000) + "]\n"),
    "accepted.yaml": ("99,990 values in YAML, under every limit",
                      "plugins:\n  relay:\n    whitelist: ["
                      + ",".join(["127.0.0.1"] * 99_990) + "]\n"),
    "huge.toml": ("2 GB file (sparse)", None),
}
LIMIT_SECONDS = 120
LIMIT_BYTES = 3 * 1024**3


def limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def run(path: Path, src: str | None) -> str:
    """check-config on *path*: exit status, wall time, peak RSS of that one process (wait4)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "ingress", "check-config", str(path)],
                                   stdout=subprocess.DEVNULL, stderr=err, env=env,
                                   preexec_fn=limit)
        deadline = started + LIMIT_SECONDS
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                return f"killed after {LIMIT_SECONDS} s"
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        trace = ", traceback" if b"Traceback" in err.read() else ""
    return (f"exit {process.returncode}{trace}, {elapsed:.2f} s, "
            f"{usage.ru_maxrss / 1024:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="DIR", help="an older source tree to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name, (what, content) in FILES.items():
            path = Path(folder) / name
            if content is None:
                with open(path, "wb") as file:
                    file.truncate(2 * 1024**3)
            else:
                path.write_text(content)
            before = run(path, args.before) if args.before else ""
            after = run(path, None)
            rows.append((what, before, after))
            print(f"{what}: {before} | {after}", file=sys.stderr)
    header = "| file | before | after |\n|---|---|---|" if args.before else \
        "| file | result |\n|---|---|"
    print(header)
    for what, before, after in rows:
        print(f"| {what} | {before} | {after} |" if args.before else f"| {what} | {after} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
