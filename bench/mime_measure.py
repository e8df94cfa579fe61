#!/usr/bin/env python3
"""CPU seconds of the max_message_size measurement of one message, as an installation runs it.

    python bench/mime_measure.py [--python PYTHON] [--repeat 3]

Builds the MIME bomb of ``attacks/mime_bomb.py`` (and a few other messages made to be slow),
then in a subprocess of PYTHON (default: this interpreter) feeds each to that installation's
``Base64Measure`` in 64 KB chunks, as the server does, and prints the process CPU time of the best
of ``--repeat`` runs and the measured size, as JSON. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from attacks.mime_bomb import SIZE, bomb

CHILD = r"""
import json, sys, time
from ingress_plugins.max_message_size import Base64Measure
out = {}
for name, path in json.loads(sys.argv[1]).items():
    data = open(path, "rb").read()
    best = None
    for _ in range(int(sys.argv[2])):
        started = time.process_time()
        counter = Base64Measure()
        for i in range(0, len(data), 1 << 16):
            counter.feed(data[i:i + (1 << 16)])
        measured = counter.finish()
        spent = time.process_time() - started
        best = spent if best is None else min(best, spent)
    out[name] = {"bytes": len(data), "measured": measured, "cpu_s": round(best, 3)}
print(json.dumps(out))
"""


def nested(depth: int) -> bytes:
    head = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for d in range(depth - 1):
        head += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (d, d + 1)
    return head + b"--b%d\r\n" % (depth - 1)


def messages() -> dict[str, bytes]:
    b64 = b"Content-Transfer-Encoding: base64\r\n\r\n"

    def fill(head: bytes, unit: bytes) -> bytes:
        return head + unit * ((SIZE - len(head)) // len(unit))

    return {
        "mime_bomb": bomb(),
        "dash_lines": fill(nested(64) + b64, b"--\r\n"),
        "empty_parts": fill(nested(64) + b64, b"--b63\r\n\r\n"),
        "header_lines": fill(nested(64), b"a: b\r\n"),
        "plain_base64": fill(nested(64) + b64, b"QUJD" * 19 + b"\r\n"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingress-mime-") as tmp:
        paths = {}
        for name, data in messages().items():
            paths[name] = str(Path(tmp) / f"{name}.eml")
            Path(paths[name]).write_bytes(data)
        done = subprocess.run([args.python, "-c", CHILD, json.dumps(paths), str(args.repeat)],
                              capture_output=True, text=True, cwd=tmp, timeout=1800)
    if done.returncode != 0:
        sys.exit(done.stderr)
    print(json.dumps({"python": args.python, **json.loads(done.stdout)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
