"""MIME bombs: ~20 MB messages of 64 nested multiparts, each level with a base64 part, the
innermost base64 part full of lines that look like delimiters of the outer multiparts. Sent over
and over from 127.0.0.2 by SENDERS concurrent clients while the normal client sends mail.

The size limit is set so that each bomb is over ``kb * 1024`` raw but under n: every one is
measured (base64 parts at their decoded size) at the end of DATA.
"""

from __future__ import annotations

import asyncio
import time

SOURCE = "127.0.0.2"
SENDERS = 6  # as many as asyncio's default pool has threads on a 2-core machine
SIZE = 20 << 20
KB = 15_000  # kb*1024 = 15.4 MB < 20 MB < n = 21.0 MB
SESSION_TIMEOUT = 120.0  # seconds for one bomb, connect to reply
MAX_MESSAGES = 10_000  # per sender, a bound on the loop


def config(workdir) -> dict:
    return {"plugins": {"max_message_size": {"kb": KB, "base64_allowance": True}}}


def bomb(size: int = SIZE) -> bytes:
    part = b"Content-Transfer-Encoding: base64\r\n\r\n" + b"QUJD\r\n" * 10
    data = (b"From: bomb@hostile.test\r\nTo: normal@hostile.test\r\nSubject: bomb\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n")
    for depth in range(63):
        data += (b"--b%d\r\n%s--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n"
                 % (depth, part, depth, depth + 1))
    data += b"--b63\r\n" + part
    return data + b"--b1x\r\n" * ((size - len(data)) // 7)


async def reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line[:3].decode()


async def send_one(port: int, payload: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(SOURCE, 0))
    try:
        await reply(reader)
        for command in (b"EHLO bomb.test", b"MAIL FROM:<bomb@hostile.test>",
                        b"RCPT TO:<normal@hostile.test>", b"DATA"):
            writer.write(command + b"\r\n")
            code = await reply(reader)
            if code[0] not in "23":
                return code
        writer.write(payload)
        writer.write(b".\r\n")
        await writer.drain()
        code = await reply(reader)
        writer.write(b"QUIT\r\n")
        return code
    finally:
        writer.close()


async def sender(port: int, payload: bytes, stop: asyncio.Event, counts: dict) -> None:
    for _ in range(MAX_MESSAGES):
        if stop.is_set():
            return
        started = time.monotonic()
        try:
            code = await asyncio.wait_for(send_one(port, payload), SESSION_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            code = type(error).__name__
        counts["replies"][code] = counts["replies"].get(code, 0) + 1
        counts["seconds"].append(time.monotonic() - started)


async def attack(port: int, stop: asyncio.Event) -> dict:
    payload = bomb()
    counts: dict = {"replies": {}, "seconds": []}
    await asyncio.gather(*(sender(port, payload, stop, counts) for _ in range(SENDERS)))
    seconds = sorted(counts["seconds"])
    return {"senders": SENDERS, "bomb_bytes": len(payload), "bombs": len(seconds),
            "replies": counts["replies"],
            "median_bomb_s": round(seconds[len(seconds) // 2], 2) if seconds else None,
            "max_bomb_s": round(seconds[-1], 2) if seconds else None}
