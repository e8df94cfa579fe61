"""One client connection's bytes and clocks: the input buffer, collected replies, flow control
and the core's two timers. Private to the core; :mod:`ingress.smtp` builds the dialogue on it.

It is a plain :class:`asyncio.Protocol` with an input buffer of its own, not an
``asyncio.StreamReader``: the dialogue needs to look into what is buffered (is a pipelined
command already here? how much of a BDAT chunk?), to put back what follows the end of DATA and
to drop what came before a TLS handshake, none of which a stream reader offers without its
private attributes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from types import SimpleNamespace
from typing import Any

from ingress.reply import Reply

log = logging.getLogger("ingress.smtp")

READ_LIMIT = 1 << 18  # input kept before reading pauses; DATA is read in pieces of this size
CLOSE_GRACE = 30.0  # seconds a closing connection may take to flush its last replies
SALVAGE_CHUNKS = 64  # bound on what is read after a reset: 64 * READ_LIMIT (kernel holds less)

# What the timers look at: the client's turn between commands, the server's turn, the client's
# turn within a command (a DATA body, a BDAT chunk, the answer to 334, replies it must read).
IDLE, BUSY, INPUT = "idle", "busy", "input"

TOO_LONG = b"\0too-long"  # what read_line gives for a line longer than READ_LIMIT
_NO_TIMERS = SimpleNamespace(timeouts={}, min_data_rate=None)


class Connection(asyncio.Protocol):
    """Bytes in and out of one connection; the dialogue subclasses it."""

    def __init__(self, plain: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._in = bytearray()
        self._waiter: asyncio.Future | None = None  # a reader waiting for input
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future | None = None  # a writer waiting for the client to read
        self._out: list[bytes] = []  # replies not yet handed to the transport (see _flush)
        self._plain = plain  # no TLS layer (yet) between the socket and us
        self._eof = False  # the client's end of stream was seen
        self._aborted = False  # we cut the session: process nothing more
        self._lost = False
        self._phase = BUSY
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = self._last_reply = 0.0
        self._rx_octets = 0  # received on this connection so far
        self._rate_from: tuple[float, int] | None = None  # see _start_data_rate
        #: what sets the timers: ``timeouts`` (seconds of the ``idle`` and ``command`` timers;
        #: absent, none) and ``min_data_rate`` ((octets per second, grace seconds) or None);
        #: the subclass points it at the session
        self.clock: Any = _NO_TIMERS

    # --- transport events -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._last_rx = self._last_reply = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        self._rx_octets += len(data)
        self._in += data
        self._wake()
        if len(self._in) > 2 * READ_LIMIT and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._phase == IDLE and "command" in self.clock.timeouts:
            self._arm()  # a partial command line now runs on the command timer

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return self._plain  # keep our side open for the last replies (not possible over TLS)

    def connection_lost(self, exc) -> None:
        self._eof = self._lost = True
        self._cancel_timer()
        if exc is not None and not self._aborted:
            self._salvage()
        self._wake()  # what the client sent before it went is still processed
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._release()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _salvage(self) -> None:
        """Take in what the kernel still holds from a client that reset the connection.

        A client may send a whole session in one write and reset the connection at once. When
        one of our replies then fails to go out, asyncio stops reading, though Linux still hands
        out the data that arrived before the reset; read it, so that it is processed like data
        before a FIN. Only on asyncio's own loop (whose socket is closed after this callback,
        never before) and on plaintext (TLS records cannot be read past the TLS layer).
        """
        if not self._plain or not isinstance(self.loop, asyncio.SelectorEventLoop):
            return
        try:
            fd = os.dup(self.transport.get_extra_info("socket").fileno())
        except (AttributeError, OSError, ValueError):
            return
        with socket.socket(fileno=fd) as sock:
            sock.setblocking(False)
            for _ in range(SALVAGE_CHUNKS):
                try:
                    chunk = sock.recv(READ_LIMIT)
                except OSError:  # nothing more (EAGAIN), or the reset itself
                    break
                if not chunk:
                    break
                self._in += chunk

    def _release(self) -> None:
        """Stop counting this connection (the subclass counts it); called once or more."""

    # --- reading ------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _at_end(self) -> bool:
        return self._eof or self._aborted

    async def _more_input(self) -> None:
        """Wait until more input arrives, the stream ends or the session is cut."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _taken(self, count: int) -> bytes:
        if count >= len(self._in):
            data = bytes(self._in)
            self._in.clear()
        else:
            data = bytes(self._in[:count])
            del self._in[:count]
        if self._reading_paused and len(self._in) <= READ_LIMIT and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def read_line(self) -> bytes | None:
        """One line with its LF; :data:`TOO_LONG` for a line longer than READ_LIMIT (the rest
        of it is read and dropped); None at the end of the stream (a partial last line is
        dropped with it)."""
        searched = 0
        while True:
            end = self._in.find(b"\n", searched)
            if end >= 0:
                return self._taken(end + 1)
            if len(self._in) > READ_LIMIT:
                return await self._drop_line()
            if self._at_end():
                return None
            searched = len(self._in)
            await self._more_input()

    async def _drop_line(self) -> bytes | None:
        while True:
            end = self._in.find(b"\n")
            if end >= 0:
                self._taken(end + 1)
                return TOO_LONG
            self._taken(len(self._in))
            if self._at_end():
                return None
            await self._more_input()

    async def read_some(self, limit: int) -> bytes:
        """At most *limit* octets, as soon as there are any; ``b""`` at the end of the
        stream."""
        while not self._in:
            if self._at_end():
                return b""
            await self._more_input()
        return self._taken(limit)

    def unread(self, data: bytes) -> None:
        """Put *data* back in front of the input (what a client pipelined after DATA's end)."""
        self._in[0:0] = data

    def buffered(self) -> int:
        """Octets received and not read yet."""
        return len(self._in)

    def has_line(self) -> bool:
        return b"\n" in self._in

    def drop_input(self) -> None:
        """Forget every octet received and not read yet (plaintext before a TLS handshake)."""
        self._taken(len(self._in))

    # --- writing ------------------------------------------------------------------------------
    # Replies are collected and handed to the transport in one write when the session is about
    # to wait for input (or closes): pipelined commands get their replies in one segment, as
    # RFC 2920 allows, and the common MAIL/RCPT/DATA burst costs one system call, not three.

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    def _close(self) -> None:
        self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _unread_replies(self) -> int:
        """Octets of replies the client has not taken yet."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    async def _client_reads(self) -> None:
        """Wait until the client has read enough of our replies (or is gone), on the command
        timer."""
        self._set_phase(INPUT)
        while self._writing_paused and not self._lost:
            self._drained = self.loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        self._set_phase(BUSY)

    def abort(self, reply: Reply | None, hard: bool = False) -> None:
        """Cut the session now: send *reply* if any, close, process nothing more. The close
        waits for the last replies to go out, for at most CLOSE_GRACE seconds; *hard* closes at
        once with a reset."""
        self._aborted = True
        self._cancel_timer()
        self._release()
        if reply is not None:
            self._write(reply.wire())
        transport = self.transport
        if transport is not None and hard:
            self._out.clear()
            transport.abort()
        else:
            self._close()  # hands over the collected replies first
            if transport is not None and transport.get_write_buffer_size():
                self.loop.call_later(CLOSE_GRACE, transport.abort)  # a client that reads nothing
        self._wake()

    # --- timers: the core owns the clock, plugins set the durations ---------------------------

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> tuple[str, float] | None:
        """Which timer runs now and when it is due: the command timer while a command is
        under way on the client's side (a partial line, after 354 or 334, or while our replies
        wait for the client to read them), the idle timer between commands."""
        if self._phase == INPUT or (self._phase == IDLE and self._in):
            kind = "command"
        elif self._phase == IDLE:
            kind = "idle"
        else:
            return None
        seconds = self.clock.timeouts.get(kind)
        due = None if seconds is None else max(self._last_reply, self._last_rx) + seconds
        rate = self.clock.min_data_rate
        if kind == "command" and rate and self._rate_from is not None:
            started, octets = self._rate_from
            # when what arrived since the start falls below rate * (t - grace)
            behind = started + rate[1] + (self._rx_octets - octets) / rate[0]
            if due is None or behind < due:
                return "data rate", behind
        return None if due is None else (kind, due)

    def _start_data_rate(self) -> None:
        """A DATA body or a BDAT chunk starts: from now on it runs on the minimum data
        rate too, if one is set, until _stop_data_rate."""
        self._rate_from = (self.loop.time(), self._rx_octets - len(self._in))

    def _stop_data_rate(self) -> None:
        self._rate_from = None

    def _arm(self) -> None:
        # A timer already set to fire no later than the new due time is kept: when it fires,
        # _on_timer looks again and sets the rest. So a command costs no cancel and new timer.
        due = self._due()
        if due is None:
            return  # an armed timer finds nothing due when it fires and stops
        timer = self._timer
        if timer is not None:
            if timer.when() <= due[1]:
                return
            timer.cancel()
            self._timer = None
        if self.transport is not None:
            self._timer = self.loop.call_at(due[1], self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._due()
        if due is None:
            return
        kind, when = due
        if when > self.loop.time():  # activity since we armed: wait for the rest
            self._timer = self.loop.call_at(when, self._on_timer)
            return
        self._timed_out(kind)

    def _timed_out(self, kind: str) -> None:
        """A timer fired: *kind* is ``idle``, ``command`` or ``data rate``."""
        self.abort(None, hard=True)
