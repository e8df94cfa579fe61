"""The benchmark's own load client: asyncio, pipelined MAIL/RCPT/DATA, a bounded message count.

    python bench/client.py --port 2525 --messages 1000 --sessions 16 --size 2048 --mode one

``--mode one`` opens a connection per message (connect, EHLO, one message, QUIT); ``--mode many``
keeps each of the ``--sessions`` connections open and sends messages on it until the shared count
is used up (what ``smtp-source -d`` does). Prints one JSON object: messages acknowledged with 250,
failures, elapsed seconds, messages/s and latency percentiles in milliseconds. Latency is per
session (connect to the reply to QUIT) in mode ``one`` and per message (MAIL to the 250 after
DATA) in mode ``many``, where a session lasts the whole run. ``--command bdat`` sends each
message as one ``BDAT <n> LAST`` chunk (RFC 3030) instead of DATA, pipelined with MAIL and RCPT.
``--acked FILE`` writes the sequence
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


class Connection(asyncio.Protocol):
    """One SMTP client connection driven by the replies it receives: no coroutine, task or
    timer per command, so that the client spends as little CPU per message as it can (it
    shares the machine with the server it measures). MAIL, RCPT and DATA go in one write."""

    def __init__(self, load: Load, seq: int):
        self.load = load
        self.seq: int | None = seq  # message being sent; None once the count is used up
        self.done = load.loop.create_future()  # result: the sequence number taken, not sent
        self.transport = None
        self.buffer = b""
        self.expect: list[int] = [220]  # codes of the replies still awaited, in order
        self.then = self.ehlo  # called once every awaited reply has come
        self.started = time.perf_counter()
        self.sent = 0.0
        self.active = self.started  # last reply; the watchdog cuts connections silent too long

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.expect:
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
            if line[3:4] == b"-":
                continue
            self.active = time.perf_counter()
            expected = self.expect.pop(0)
            if line[:3] != b"%d" % expected:
                self.finish(Failed(line.decode(errors="replace").strip()))
                return
            if not self.expect:
                self.then()

    def connection_lost(self, exc) -> None:
        self.finish(Failed(f"connection closed: {exc}"))

    def send(self, data: bytes, expect: list[int], then) -> None:
        self.expect = expect
        self.then = then
        self.transport.write(data)

    def ehlo(self) -> None:
        self.send(b"EHLO client.test\r\n", [250], self.message)

    def message(self) -> None:
        load = self.load
        rcpt_index = self.seq % len(load.recipients)
        self.sent = time.perf_counter()
        if load.args.command == "bdat":  # the whole transaction in one write
            head, rest = load.parts[rcpt_index]
            data = head + b"%07d" % self.seq + rest
            self.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nBDAT %d LAST\r\n%s" % (
                load.sender, load.recipients[rcpt_index], len(data), data), [250, 250, 250],
                self.acked)
            return
        self.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (
            load.sender, load.recipients[rcpt_index]), [250, 250, 354], self.body)

    def body(self) -> None:
        head, rest = self.load.parts[self.seq % len(self.load.recipients)]
        self.send(head + b"%07d" % self.seq + rest + b".\r\n", [250], self.acked)

    def acked(self) -> None:
        load = self.load
        load.acked.append(self.seq)
        if load.args.mode == "many":
            load.latencies.append(time.perf_counter() - self.sent)
            self.seq = load.take()
            if self.seq is not None:
                self.message()
                return
        else:
            self.seq = None
        self.send(b"QUIT\r\n", [221], self.quit)

    def quit(self) -> None:
        if self.load.args.mode == "one":
            self.load.latencies.append(time.perf_counter() - self.started)
        self.finish(None)

    def finish(self, error: Exception | None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.load.fail(f"{type(error).__name__}: {error}")
            self.seq = None  # the message that failed is not retried
        self.done.set_result(self.seq)
        if self.transport is not None:
            self.transport.close()


class Load:
    def __init__(self, args):
        self.args = args
        self.loop: asyncio.AbstractEventLoop | None = None
        self.next_seq = 0
        self.acked: list[int] = []
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.sender = args.sender.encode()
        addresses = [f"user{i}@{args.domain}" for i in range(args.users)]
        self.recipients = [a.encode() for a in addresses]
        self.parts = [message_parts(args.size, args.sender, a) for a in addresses]
        self.open: set[Connection] = set()

    def take(self) -> int | None:
        if self.next_seq >= self.args.messages:
            return None
        self.next_seq += 1
        return self.next_seq - 1

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why[:60]] = self.errors.get(why[:60], 0) + 1

    async def connection(self, first: int) -> int | None:
        """One connection: the message *first* and, in mode many, more. Returns the sequence
        number taken but not sent (None when the count is used up)."""
        conn = Connection(self, first)
        self.open.add(conn)
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: conn, self.args.host, self.args.port), TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            conn.finish(exc)
        try:
            return await conn.done
        finally:
            self.open.discard(conn)

    async def watchdog(self) -> None:
        """Fail connections that have waited for a reply longer than TIMEOUT."""
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for conn in list(self.open):
                if now - conn.active > TIMEOUT:
                    conn.finish(Failed(f"no reply within {TIMEOUT:.0f}s"))

    async def worker(self) -> None:
        seq = self.take()
        while seq is not None:
            left = await self.connection(seq)
            seq = left if left is not None else self.take()

    async def run(self) -> dict:
        self.loop = asyncio.get_running_loop()
        watchdog = asyncio.ensure_future(self.watchdog())
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self.worker() for _ in range(self.args.sessions)))
        finally:
            watchdog.cancel()
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
    p.add_argument("--command", choices=["data", "bdat"], default="data",
                   help="send each message with DATA, or as one BDAT LAST chunk")
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
