"""200 slow clients from one address: each connects from 127.0.0.2, starts a message and sends
its body one byte a second, for as long as the server lets it; when it is refused or cut it waits
a second and connects again. The server has ``max_connections.limit = 50`` (the scenario of the
issue: before ``per_ip`` existed, 50 of them held every slot and nobody else was served).

The config leaves out what older servers do not know (``per_ip``, ``min_data_rate``), so one
attack runs against both; give the defences with hostile.py's ``--set``, e.g.
``--set plugins.max_connections.per_ip=10 --set plugins.command_timeout.min_data_rate=100``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

HOST = "127.0.0.1"
SOURCE = "127.0.0.2"
CLIENTS = 200
TICK = 1.0  # seconds between two bytes of a body, and before connecting again
STEP = 5.0  # timeout of a connect or a reply


def config(workdir) -> dict:
    return {"plugins": {"max_connections": {"limit": 50}}}


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One reply (the last line of a multi-line one)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), STEP)
        if line[3:4] != b"-":
            return line


async def one_session(port: int, stop: asyncio.Event, counts: Counter, state: dict) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, local_addr=(SOURCE, 0)), STEP)
    try:
        greeting = await reply(reader)
        if not greeting.startswith(b"220"):
            counts["refused " + greeting[:9].decode(errors="replace")] += 1
            return
        writer.write(b"EHLO slow.test\r\nMAIL FROM:<slow@slow.test>\r\n"
                     b"RCPT TO:<victim@hostile.test>\r\nDATA\r\n")
        for _ in range(4):
            last = await reply(reader)
        if not last.startswith(b"354"):
            counts["no 354"] += 1
            return
        counts["bodies started"] += 1
        state["holding"] += 1
        state["peak"] = max(state["peak"], state["holding"])
        try:
            while not stop.is_set():
                writer.write(b"x")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.readline(), TICK)
                except asyncio.TimeoutError:
                    continue
                counts["cut " + answer[:9].decode(errors="replace") if answer else "cut EOF"] += 1
                return
        finally:
            state["holding"] -= 1
    finally:
        writer.close()


async def slow_client(port: int, stop: asyncio.Event, counts: Counter, state: dict) -> None:
    await asyncio.sleep(random.random() * TICK)  # not all in the same instant
    while not stop.is_set():
        counts["connections"] += 1
        try:
            await one_session(port, stop, counts, state)
        except (OSError, asyncio.TimeoutError) as error:
            counts[type(error).__name__] += 1
        if not stop.is_set():
            await asyncio.sleep(TICK)


async def attack(port: int, stop: asyncio.Event) -> dict:
    counts: Counter = Counter()
    state = {"holding": 0, "peak": 0}
    await asyncio.gather(*(slow_client(port, stop, counts, state) for _ in range(CLIENTS)))
    return {"clients": CLIENTS, "source": SOURCE, "peak_bodies_open": state["peak"],
            **dict(sorted(counts.items()))}
