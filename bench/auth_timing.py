#!/usr/bin/env python3
"""Does the time of a failed AUTH tell who exists? Time failing ``AUTH PLAIN`` for an unknown user,
a bcrypt user and an argon2 user.

    python bench/auth_timing.py [--rounds 15] [--failure-delay S] [--server-python PYTHON]

Starts ``PYTHON -m ingress serve`` on a free port of 127.0.0.1 (as bench/hostile.py does) with an
argon2id user (64 MiB, time cost 3, parallelism 4; listed first, so the dummy hash that unknown
users are checked against is made like it) and a bcrypt user (cost 10), ``[plugins.auth]`` at its
defaults (or with ``--failure-delay``) except that PLAIN is allowed without TLS. Each round
times, in a shuffled order, one wrong password per kind of user, each on a fresh session, one at
a time: from just before the AUTH line is sent to the 535. Prints per kind the mean, standard
deviation, median, minimum and maximum in milliseconds, and Welch's t for each pair (|t| of a few
or more: the kinds can be told apart).
Every loop is bounded; only 127.0.0.1 is contacted. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import argon2
import bcrypt
from common import stop as stop_process
from hostile import HOST, expect, start_server

USERS = {
    "argon2": "argon@hostile.test",
    "bcrypt": "crypt@hostile.test",
    "unknown": "nobody@hostile.test",
}


def config(failure_delay: float | None) -> dict:
    argon = argon2.PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4).hash("pw-a")
    crypt = bcrypt.hashpw(b"pw-b", bcrypt.gensalt(10)).decode()
    auth = {"disable_plain_without_tls": False}
    if failure_delay is not None:  # an older installation may not know the setting
        auth["failure_delay"] = failure_delay
    return {
        "directory": {"users": [{"address": USERS["argon2"], "password_hash": argon},
                                {"address": USERS["bcrypt"], "password_hash": crypt}]},
        "plugins": {"auth": auth},
    }


async def failed_auth_seconds(port: int, user: str) -> float:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await expect(reader, "220")
        writer.write(b"EHLO timing.test\r\n")
        await expect(reader, "250")
        token = base64.b64encode(f"\0{user}\0wrong-password".encode())
        started = time.monotonic()
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        await expect(reader, "535")
        return time.monotonic() - started
    finally:
        writer.close()


def welch_t(a: list[float], b: list[float]) -> float:
    error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return (statistics.mean(a) - statistics.mean(b)) / error if error else float("inf")


async def measure(args) -> dict:
    times: dict[str, list[float]] = {kind: [] for kind in USERS}
    with tempfile.TemporaryDirectory(prefix="ingress-auth-timing-") as tmp:
        proc, port = start_server(args.server_python, Path(tmp), config(args.failure_delay))
        try:
            await asyncio.sleep(1)
            await failed_auth_seconds(port, USERS["unknown"])  # makes the dummy hash
            for _ in range(args.rounds):
                kinds = list(USERS)
                random.shuffle(kinds)
                for kind in kinds:
                    seconds = await asyncio.wait_for(failed_auth_seconds(port, USERS[kind]), 60)
                    times[kind].append(seconds)
        finally:
            stop_process(proc, grace=10)
    ms = {kind: [1000 * value for value in values] for kind, values in times.items()}
    return {
        "server_python": args.server_python, "rounds": args.rounds,
        "failure_delay": args.failure_delay,
        "ms": {kind: {"mean": round(statistics.mean(v), 1), "stdev": round(statistics.stdev(v), 1),
                      "median": round(statistics.median(v), 1), "min": round(min(v), 1),
                      "max": round(max(v), 1)}
               for kind, v in ms.items()},
        "welch_t": {f"{a} vs {b}": round(welch_t(ms[a], ms[b]), 2)
                    for a, b in itertools.combinations(USERS, 2)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="failures per kind of user")
    parser.add_argument("--server-python", default=sys.executable,
                        help="the interpreter whose installed ingress is measured")
    parser.add_argument("--failure-delay", type=float,
                        help="set [plugins.auth] failure_delay (default: the server's default)")
    args = parser.parse_args()
    if not 2 <= args.rounds <= 1000:
        parser.error("--rounds must be 2..1000")
    print(json.dumps(asyncio.run(measure(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
