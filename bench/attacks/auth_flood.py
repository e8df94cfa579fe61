"""AUTH flood: 20 connections from 127.0.0.2 failing ``AUTH PLAIN`` in a loop against a user whose
password hash is a 64 MiB argon2id hash (argon2-cffi's defaults: time cost 3, 64 MiB,
parallelism 4). A session the server closes (``max_bad_commands`` after the 8th 535) is opened
again. For bench/hostile.py; see its docstring.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import argon2

HOST = "127.0.0.1"
SOURCE = "127.0.0.2"
CONNECTIONS = 20
VICTIM = "victim@hostile.test"
MAX_ATTEMPTS = 100_000  # per connection: a bound that a run of minutes never reaches
REPLY_TIMEOUT = 60.0


def config(workdir: Path) -> dict:
    hasher = argon2.PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4)
    return {
        "directory": {"users": [{"address": VICTIM, "password_hash": hasher.hash("s3cret")}]},
        # AUTH PLAIN is offered only after TLS by default; the bench talks plaintext.
        "plugins": {"auth": {"disable_plain_without_tls": False}},
    }


async def _reply(reader: asyncio.StreamReader) -> int:
    """The code of one (possibly multi-line) reply; 0 when the server closed."""
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if len(line) < 4:
            return 0
        if line[3:4] != b"-":
            return int(line[:3])


async def _connection(port: int, n: int, stop: asyncio.Event, counts: dict) -> None:
    attempts = 0
    while not stop.is_set() and attempts < MAX_ATTEMPTS:
        try:
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(SOURCE, 0))
        except OSError:
            counts["connect_errors"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["connections"] += 1
        try:
            if await _reply(reader) != 220:
                continue
            writer.write(b"EHLO flood.test\r\n")
            if await _reply(reader) != 250:
                continue
            while not stop.is_set() and attempts < MAX_ATTEMPTS:
                attempts += 1
                token = base64.b64encode(f"\0{VICTIM}\0guess-{n}-{attempts}".encode())
                writer.write(b"AUTH PLAIN " + token + b"\r\n")
                code = await _reply(reader)
                counts[str(code)] = counts.get(str(code), 0) + 1
                if code != 535:
                    break  # 421 after too many errors, or closed: connect again
        except (OSError, asyncio.TimeoutError, ValueError):
            counts["errors"] += 1
        finally:
            writer.close()


async def attack(port: int, stop: asyncio.Event) -> dict:
    counts = {"connections": 0, "connect_errors": 0, "errors": 0}
    await asyncio.gather(*(_connection(port, n, stop, counts) for n in range(CONNECTIONS)))
    return counts
