"""The benchmark's own load client: asyncio, pipelined MAIL/RCPT/DATA, a bounded message count.

    python bench/client.py --port 2525 --messages 1000 --sessions 16 --size 2048 --mode one

``--mode one`` opens a connection per message (connect, EHLO, one message, QUIT); ``--mode many``
keeps each of the ``--sessions`` connections open and sends messages on it until the shared count
is used up (what ``smtp-source -d`` does). Prints one JSON object: messages acknowledged with 250,
failures, elapsed seconds, messages/s and latency percentiles in milliseconds. Latency is per
session (connect to the reply to QUIT) in mode ``one`` and per message (MAIL to the 250 after
DATA) in mode ``many``, where a session lasts the whole run. ``--acked FILE`` writes the sequence
number of every acknowledged message, one per line; each message carries it as ``X-Bench-Seq``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import common

TIMEOUT = 120.0  # per reply: a stuck server fails the run instead of hanging it
LINE = b"x" * 76 + b"\r\n"


def message_parts(size: int, sender: str, recipient: str) -> tuple[bytes, bytes]:
    """(head, rest) of a *size*-byte message; the sequence number goes between them."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench\r\n"
            f"Message-ID: <bench@client.test>\r\nX-Bench-Seq: ").encode()
    fixed = len(head) + len(b"0000000\r\n\r\n")
    lines, extra = divmod(max(size - fixed, 0), len(LINE))
    body = LINE * lines + (b"y" * max(extra - 2, 0) + b"\r\n" if extra else b"")
    return head, b"\r\n\r\n" + body


class Failed(Exception):
    pass


class Load:
    def __init__(self, args):
        self.args = args
        self.next_seq = 0
        self.acked: list[int] = []
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.recipients = [f"user{i}@{args.domain}" for i in range(args.users)]
        self.parts = [message_parts(args.size, args.sender, r) for r in self.recipients]

    def take(self) -> int | None:
        if self.next_seq >= self.args.messages:
            return None
        self.next_seq += 1
        return self.next_seq - 1

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why[:60]] = self.errors.get(why[:60], 0) + 1

    async def reply(self, reader: asyncio.StreamReader, expect: int) -> None:
        while True:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            if len(line) < 4:
                raise Failed(f"connection closed or bad reply {line!r}")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != expect:
            raise Failed(line.decode(errors="replace").strip())

    async def send_message(self, reader, writer, seq: int) -> None:
        rcpt_index = seq % len(self.recipients)
        head, rest = self.parts[rcpt_index]
        writer.write(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (
            self.args.sender.encode(), self.recipients[rcpt_index].encode()))
        await self.reply(reader, 250)
        await self.reply(reader, 250)
        await self.reply(reader, 354)
        writer.write(head + b"%07d" % seq + rest + b".\r\n")
        await writer.drain()
        await self.reply(reader, 250)
        self.acked.append(seq)

    async def connection(self, first: int) -> int | None:
        """One connection: the message *first* and, in mode many, more. Returns the sequence
        number taken but not sent (None when the count is used up)."""
        started = time.perf_counter()
        seq: int | None = first
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.args.host, self.args.port), TIMEOUT)
            await self.reply(reader, 220)
            writer.write(b"EHLO client.test\r\n")
            await self.reply(reader, 250)
            while seq is not None:
                sent = time.perf_counter()
                await self.send_message(reader, writer, seq)
                if self.args.mode == "one":
                    seq = None
                    break
                self.latencies.append(time.perf_counter() - sent)
                seq = self.take()
            writer.write(b"QUIT\r\n")
            await self.reply(reader, 221)
            if self.args.mode == "one":
                self.latencies.append(time.perf_counter() - started)
        except (Failed, OSError, asyncio.TimeoutError) as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            seq = None  # the message that failed is not retried
        finally:
            if writer is not None:
                writer.close()
        return seq

    async def worker(self) -> None:
        while (seq := self.take()) is not None:
            await self.connection(seq)

    async def run(self) -> dict:
        started = time.perf_counter()
        await asyncio.gather(*(self.worker() for _ in range(self.args.sessions)))
        elapsed = time.perf_counter() - started
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        return {
            "acked": len(self.acked), "failed": self.failed, "errors": self.errors,
            "elapsed": round(elapsed, 4), "rate": round(len(self.acked) / elapsed, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--size", type=int, default=2048, help="bytes per message")
    p.add_argument("--mode", choices=["one", "many"], default="one",
                   help="messages per connection: one, or many (until the count is used up)")
    p.add_argument("--domain", default="bench.test")
    p.add_argument("--users", type=int, default=4, help="recipients user0..user<N-1>@domain")
    p.add_argument("--sender", default="sender@client.test")
    p.add_argument("--acked", metavar="FILE", help="write acknowledged sequence numbers here")
    p.add_argument("--no-uvloop", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("the benchmark client only talks to 127.0.0.1/::1")
    load = Load(args)
    result = common.run(load.run(), uvloop=not args.no_uvloop)
    if args.acked:
        with open(args.acked, "w") as f:
            f.write("".join(f"{s}\n" for s in load.acked))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
