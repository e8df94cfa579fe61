"""The SMTP dialogue: one instance per connection, built on :class:`ingress.connection.Connection`
(bytes and clocks) and :mod:`ingress.syntax` (pure parsing). Private to the core.

aiosmtpd serves ingress with its PROXY protocol signature (:mod:`ingress.proxy`) and as the
reference it was checked against; its protocol class is not used: the contract needs what it
does not do (hooks on connect/disconnect/every command, idle and in-command timers that answer
``421``, DATA streamed to a spool in bounded memory with strict CRLF.CRLF, BDAT, our own MAIL/RCPT
parameter parsing, enhanced status codes on every reply, and processing what a client sent
before it closed the connection). See docs/core-behaviour.md.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ingress.auth import AuthCancelled, AuthSyntaxError
from ingress.connection import BUSY, IDLE, INPUT, READ_LIMIT, TOO_LONG, Connection
from ingress.dispatch import FAILED
from ingress.reply import Reply
from ingress.session import Recipient, Session, Transaction
from ingress.spool import Message
from ingress.syntax import (
    AUTH_LINE_LIMIT,
    BARE_CR_OR_LF,
    MAX_RECIPIENTS,
    bdat_size,
    merge_size_keywords,
    parse_params,
    parse_path,
    query_argument,
    sasl_response,
    split_command,
    too_long,
    valid_address,
)

if TYPE_CHECKING:
    import ssl

    from ingress.config import Config
    from ingress.keycounts import KeyCounts
    from ingress.state import Backend

log = logging.getLogger("ingress.smtp")
refusal_log = logging.getLogger("ingress.refusals")  # one line per 4xx/5xx reply

R_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R_NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
R_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R_OK = Reply(250, "2.0.0", "OK")
R_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
R_NOT_UTF8 = Reply(501, "5.5.2", "Command line is not valid UTF-8")
R_NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")


class Host(Protocol):
    """What a connection needs of the server that accepted it (ingress.server.Server)."""

    config: Config
    tls_context: ssl.SSLContext | None
    key_counts: KeyCounts
    state: Backend | None

    @property
    def connections(self) -> int: ...
    def connection_opened(self, protocol: Any) -> None: ...
    def connection_closed(self, protocol: Any) -> None: ...
    def session_ended(self, protocol: Any) -> None: ...
    def message_accepted(self, session: Session, transaction: Transaction,
                         message: Message) -> None: ...
    def spool_dir(self, cfg: Config) -> Path: ...


class Stage(enum.Enum):
    """Where the dialogue is; each command checks it, and only the commands below change it."""

    GREETING = "before HELO"  # connected, or after STARTTLS: HELO/EHLO first
    READY = "ready"  # after HELO/EHLO, RSET or the end of a message
    MAIL = "after MAIL"  # a transaction without recipients yet
    RCPT = "after RCPT"  # a transaction with recipients: DATA or BDAT may follow
    CHUNKS = "in BDAT"  # BDAT chunks of the transaction received; more or LAST follow


# The stages as plain names: looking a member up on an Enum class costs ten times a global's
# on Python 3.10 and 3.11, and every command looks.
GREETING, READY, MAIL, RCPT, CHUNKS = Stage
IN_TRANSACTION = (MAIL, RCPT, CHUNKS)


class SMTPProtocol(Connection):
    def __init__(self, server: Host, *, tls_listener: bool, peer: tuple, local: tuple):
        super().__init__(plain=not tls_listener)
        self.server = server
        self.config = server.config  # this connection's config generation
        self.hooks = self.config.hooks
        self.tls_listener = tls_listener
        self._peer, self._local = peer, local  # from accept(), not the transport (see Listener)
        self.session: Session | None = None
        self.stage = GREETING
        self._counted = False  # this connection is in server.connections
        self._keys: list[str] = []  # and counted under these keys (session.count_concurrent)
        self._handler_task: asyncio.Task | None = None
        self._on_command = self.hooks.has("on_command")
        self._on_reply = self.hooks.has("on_reply")
        self._chunks: Message | None = None  # BDAT chunks received so far (stage CHUNKS)
        self._verb = "CONNECT"  # the command being answered (the connection, before any)

    # --- the connection's life ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.server.connection_opened(self)
        self._counted = True
        self.session = Session(
            self.config,
            self._peer,
            self._local,
            tls=self.tls_listener,
            connections=self.server.connections,
        )
        self.session._count_concurrent = self._count_concurrent
        self.clock = self.session  # its timeouts and min_data_rate run the timers
        self.session.state_backend = self.server.state
        self._handler_task = self.loop.create_task(self._handle_client())

    def _release(self) -> None:
        """Stop counting this connection, once: when it is lost or when we cut it."""
        if self._counted:
            self._counted = False
            self.server.connection_closed(self)
            for key in self._keys:
                self.server.key_counts.remove(key)
            self._keys.clear()

    def _count_concurrent(self, key: str) -> int:
        counts = self.server.key_counts
        # Not once released (the client is gone): that count would never be taken back.
        if self._counted and counts.add(key):
            self._keys.append(key)
            return counts.total(key)
        return counts.total(key) + 1

    def _timed_out(self, kind: str) -> None:
        text = "Session timeout" if kind == "idle" else "Command timeout"
        log.info("session %s %s: %s%s", self.session.id, self.session.peer_ip, text.lower(),
                 " (data rate)" if kind == "data rate" else "")
        if self._unread_replies() or not (self._plain or self.session.tls):
            # It has not even taken our earlier replies, or it is stuck in the TLS handshake
            # after STARTTLS: a 421 could not reach it.
            self.abort(None, hard=True)
            return
        self.abort(Reply(421, "4.4.2", f"{self.session.hostname} {text}", close=True))

    # --- replies ------------------------------------------------------------------------------

    async def send(self, reply: Reply, plugin: str = "core") -> None:
        self._write(reply.wire())
        self._last_reply = self.loop.time()
        if reply.code >= 400:
            self._log_refusal(reply, plugin)
        if self._on_reply:  # also for a closing reply: metrics count it
            follow, by = await self.hooks.call("on_reply", session=self.session, reply=reply,
                                                plugin=plugin)
            if follow is not None and not reply.close:
                self._write(follow.wire())
                if follow.code >= 400:
                    self._log_refusal(follow, by)
                if follow.close:
                    self.abort(None)
                    return
        if reply.close:
            self.abort(None)
            return
        if len(self._out) > 64:  # a client pipelining without reading: hand over, then drain
            self._flush()
        if self._unread_replies() > READ_LIMIT:
            await self._client_reads()  # it is not reading our replies: wait for it

    def _log_refusal(self, reply: Reply, plugin: str) -> None:
        """One log line per refusal: the plugin (``core`` for the protocol's own), the command
        and the reply; the JSON log format also gets them as fields."""
        if refusal_log.isEnabledFor(logging.INFO):
            session = self.session
            refusal_log.info(
                "session %s %s %s refused by %s: %s", session.id, session.peer_ip, self._verb,
                plugin, reply, extra={"fields": {
                    "session": session.id, "client": session.peer_ip, "command": self._verb,
                    "plugin": plugin, "code": reply.code, "enhanced": reply.enhanced}})

    # --- the session --------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        session = self.session
        try:
            if await self._greet():
                while not self._aborted:
                    line = await self._read_command()
                    if line is None or self._aborted:
                        break
                    self._set_phase(BUSY)
                    await self._dispatch(line)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session %s: internal error", session.id)
            self.abort(Reply(421, "4.3.0", f"{session.hostname} Internal error, closing"))
        finally:
            self._cancel_timer()
            self._release()
            self._close()
            self._drop_chunks()
            await self._end()

    async def _end(self) -> None:
        session = self.session
        try:
            await self.hooks.call("on_disconnect", session=session)
        finally:
            self.server.session_ended(self)
            log.info(
                "session %s %s ended: %d message(s), %.3fs",
                session.id, session.peer_ip, session.messages_accepted,
                time.time() - session.connected_at,
            )

    async def _greet(self) -> bool:
        session = self.session
        await self.hooks.call("connection_opened", session=session)
        reply, plugin = await self.hooks.call("on_connect", session=session)
        if reply is None:
            text, _ = await self.hooks.call("greeting", session=session)
            if not isinstance(text, str):  # none, or a failed plugin
                text = f"{session.hostname} ESMTP"
            reply = Reply(220, "", text)
        elif reply.close or reply.code >= 400:
            await self.send(dataclasses.replace(reply, close=True), plugin)
            return False
        self._write(reply.wire())
        self._last_reply = self.loop.time()
        self._set_phase(IDLE)
        return True

    async def _read_command(self) -> bytes | None:
        """One command line (without line ending); TOO_LONG for an over-long line; None at the
        end of the stream. The client's turn: on the idle timer until a partial line arrives."""
        self._set_phase(IDLE)
        if self._out and not self.has_line():
            self._flush()  # we are going to wait for the client
        line = await self.read_line()
        if line is None or line is TOO_LONG:
            return line
        return TOO_LONG if too_long(line) else line.rstrip(b"\r\n")

    async def _read_command_input(self) -> bytes | None:
        """A line answering a ``334`` challenge: on the command timer; then the server's turn
        again (checking a password runs on no timer)."""
        self._set_phase(INPUT)
        if self._out and not self.has_line():
            self._flush()
        line = await self.read_line()
        self._set_phase(BUSY)
        if line is None or line is TOO_LONG:
            return line
        return TOO_LONG if len(line) > AUTH_LINE_LIMIT else line.rstrip(b"\r\n")

    async def _dispatch(self, line: bytes) -> None:
        self._verb = "?"  # not known yet
        if line is TOO_LONG:
            await self.send(R_LINE_TOO_LONG)
            return
        if b"\0" in line:
            await self.send(R_SYNTAX)
            return
        verb, arg = split_command(line)
        self._verb = verb if verb.isalpha() and len(verb) <= 16 else "?"  # safe in a log line
        if arg is None:  # nothing is read after a BDAT: no size could be parsed from it either
            await self.send(R_NOT_UTF8 if verb in COMMANDS else R_SYNTAX)
            return
        if self._on_command:
            reply, plugin = await self.hooks.call("on_command", session=self.session,
                                                    verb=verb, arg=arg)
            if reply is not None:
                if verb == "BDAT" and not reply.close:  # its octets follow: read them first
                    size = bdat_size(arg)
                    if size is not None and not await self._read_octets(size[0], None):
                        return
                await self.send(reply, plugin)
                return
        method = COMMANDS.get(verb)
        if method is None or not verb.isalpha():
            if verb in ("TURN", "ETRN", "SEND", "SAML", "SOML", "ATRN"):
                await self.send(Reply(502, "5.5.1", f"{verb} not implemented"))
            else:
                await self.send(R_SYNTAX)
            return
        await method(self, arg)

    def _enter(self, stage: Stage) -> None:
        if stage is not CHUNKS:
            self._drop_chunks()
        self.stage = stage

    # --- commands -----------------------------------------------------------------------------

    async def cmd_helo(self, arg: str) -> None:
        session, verb = self.session, self._verb
        if not arg or " " in arg or not arg.isprintable() or not arg.isascii():
            await self.send(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        reply, plugin = await self.hooks.call("on_helo", session=session, verb=verb,
                                                hostname=arg)
        if reply is not None and not reply.is_positive:  # vouched: the core still greets
            await self.send(reply, plugin)
            return
        auth_user = session.auth_user
        session.reset_smtp_state()
        session.auth_user = auth_user  # a second EHLO does not log the client out
        session.helo, session.esmtp = arg, verb == "EHLO"
        self._enter(READY)
        greeting = f"{session.hostname} Hello {arg} {session.ip_literal}"
        if verb == "HELO":
            await self.send(Reply(250, "", greeting))
            return
        await self.send(Reply(250, "", (greeting, *await self.ehlo_keywords())))

    async def ehlo_keywords(self) -> list[str]:
        session = self.session
        added = [kw for _, kws in await self.hooks.call("ehlo_keywords", session=session)
                 for kw in kws]
        keywords = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "BINARYMIME",
                    "SMTPUTF8"]
        if self.server.tls_context is not None and not session.tls:
            keywords.append("STARTTLS")
        mechanisms = [m.name for m in await self.auth_mechanisms() if m.advertised]
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
        return keywords + merge_size_keywords(added)

    async def auth_mechanisms(self) -> list:
        return [m for _, ms in await self.hooks.call("auth_mechanisms", session=self.session)
                for m in ms]

    async def cmd_mail(self, arg: str) -> None:
        session = self.session
        if self.stage is GREETING:
            await self.send(R_NEED_HELO)
            return
        if self.stage is not READY:
            await self.send(Reply(503, "5.5.1", "Nested MAIL command"))
            return
        parsed = parse_path(arg, "FROM:")
        if parsed is None:
            await self.send(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]"))
            return
        address, params_text = parsed
        if address and not valid_address(address):
            await self.send(Reply(501, "5.1.7", "Bad sender address syntax"))
            return
        params, error = parse_params(params_text)
        if not address.isascii() and "SMTPUTF8" not in params:
            await self.send(R_NEED_SMTPUTF8)
            return
        transaction = Transaction(address, params, param_error=error)
        reply, plugin = await self.hooks.call("on_mail_from", session=session,
                                                transaction=transaction)
        if reply is not None and not reply.is_positive:
            await self.send(reply, plugin)
            return
        session.transaction = transaction
        self._enter(MAIL)
        await self.send(reply or R_SENDER_OK, plugin or "core")

    async def cmd_rcpt(self, arg: str) -> None:
        session = self.session
        transaction = session.transaction
        if self.stage not in IN_TRANSACTION:
            await self.send(R_NEED_MAIL)
            return
        parsed = parse_path(arg, "TO:")
        if parsed is None:
            await self.send(Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]"))
            return
        address, params_text = parsed
        if address.lower() == "postmaster":
            address = f"{address}@{min(session.directory.domains)}"
        if not valid_address(address):
            await self.send(Reply(501, "5.1.3", "Bad recipient address syntax"))
            return
        if not address.isascii() and not transaction.smtputf8:
            await self.send(R_NEED_SMTPUTF8)
            return
        if len(transaction.recipients) >= MAX_RECIPIENTS:
            await self.send(Reply(452, "4.5.3", "Too many recipients"))
            return
        params, error = parse_params(params_text)
        recipient = Recipient(address, params, session.directory.is_local_address(address),
                              param_error=error)
        reply, plugin = await self.hooks.call("on_rcpt", session=session,
                                                transaction=transaction, recipient=recipient)
        if reply is not None and not reply.is_positive:
            await self.send(reply, plugin)
            return
        transaction.recipients.append(recipient)
        if self.stage is MAIL:
            self._enter(RCPT)
        await self.send(reply or R_RECIPIENT_OK, plugin or "core")

    async def cmd_data(self, arg: str) -> None:
        session = self.session
        transaction = session.transaction
        if self.stage not in IN_TRANSACTION:
            await self.send(R_NEED_MAIL)
            return
        if self.stage is MAIL:
            await self.send(Reply(503, "5.5.1", "Need RCPT command first"))
            return
        if arg:
            await self.send(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if self.stage is CHUNKS:
            await self.send(Reply(503, "5.5.1", "DATA not allowed after BDAT"))
            return
        if (transaction.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            await self.send(Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT"))
            return
        self._write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._last_reply = self.loop.time()
        message = Message(self.server.spool_dir(self.config), transaction.data_limit)
        try:
            self._start_data_rate()
            complete = await self._receive(message)
            self._stop_data_rate()
            session.transaction = None
            self._enter(READY)
            if not complete or self._aborted:
                return  # an incomplete message is never delivered
            await self._finish_message(transaction, message)
        finally:
            self._stop_data_rate()
            message.close()

    async def _receive(self, message: Message) -> bool:
        """Stream the DATA body into *message*: dot-unstuffed, bare CR/LF made CRLF, strictly
        ended by CRLF.CRLF. Octets the client pipelined after the end stay in the input."""
        self._set_phase(INPUT)
        self._flush()  # the 354 (and the replies pipelined before it)
        pending = b"\r\n"  # the body starts at a line start; this CRLF is not stored
        first = True
        while True:
            chunk = await self.read_some(READ_LIMIT)
            if not chunk or self._aborted:
                return False
            buf = pending + chunk
            end = buf.find(b"\r\n.\r\n")
            if end >= 0:
                body, rest = buf[: end + 2], buf[end + 5:]
                if rest:
                    self.unread(rest)  # pipelined commands after the final dot
                pending = b""
            else:
                # Keep from the last CRLF on, so that no CRLF.CRLF or CRLF. straddles chunks.
                cut = buf.rfind(b"\r\n")
                if cut <= 0:
                    cut = max(len(buf) - 1, 0) if len(buf) > 4 else 0
                body, pending = buf[:cut], buf[cut:]
            if body:
                body = body.replace(b"\r\n.", b"\r\n")
                crlf = body.count(b"\r\n")
                if body.count(b"\r") != crlf or body.count(b"\n") != crlf:  # rare: regex
                    body = BARE_CR_OR_LF.sub(b"\r\n", body)
                if first:
                    body, first = body[2:], False
                message.write(body)
            if end >= 0:
                return True

    async def cmd_bdat(self, arg: str) -> None:
        """A chunk of the message (RFC 3030): exactly *n* octets, read before any reply."""
        session = self.session
        size = bdat_size(arg)
        if size is None:  # nothing is read: a size we cannot parse is no promise of octets
            await self.send(Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]"))
            return
        octets, last = size
        transaction = session.transaction
        error = None
        if self.stage not in IN_TRANSACTION:
            error = R_NEED_MAIL
        elif self.stage is MAIL:
            error = Reply(503, "5.5.1", "Need RCPT command first")
        if error is not None:
            if await self._read_octets(octets, None):
                await self.send(error)
            return
        if self._chunks is None:
            self._chunks = Message(self.server.spool_dir(self.config), transaction.data_limit)
            self._enter(CHUNKS)
        message = self._chunks
        if not await self._read_octets(octets, message) or self._aborted:
            self._drop_chunks()  # an incomplete message is never delivered
            return
        if not last:
            await self.send(Reply(250, "2.0.0", f"{octets} octets received"))
            return
        self._chunks = None  # this call closes it
        session.transaction = None
        self._enter(READY)
        try:
            await self._finish_message(transaction, message)
        finally:
            message.close()

    async def _read_octets(self, count: int, message: Message | None) -> bool:
        """Read exactly *count* octets (a BDAT chunk) into *message*, or throw them away when it
        is None; on the command timer and the minimum data rate. False at end of stream."""
        self._set_phase(INPUT)
        if self.buffered() < count:
            self._flush()  # we are going to wait for the client
        self._start_data_rate()
        try:
            while count:
                data = await self.read_some(min(count, READ_LIMIT))
                if not data or self._aborted:
                    return False
                count -= len(data)
                if message is not None:
                    message.write(data)
        finally:
            self._stop_data_rate()
        self._set_phase(BUSY)
        return True

    def _drop_chunks(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None

    async def _finish_message(self, transaction: Transaction, message: Message) -> None:
        session = self.session
        self._set_phase(BUSY)
        if message.failed is not None and not message.oversized:  # disk full, permission
            log.error("queue id %s: spooling the message failed: %s", transaction.id,
                      message.failed)
            await self.send(Reply(451, "4.3.0", "Local storage error, try again later"))
            return
        vouched, voucher = await self.hooks.call("on_data", session=session,
                                                   transaction=transaction, message=message)
        if vouched is not None and not vouched.is_positive:
            await self.send(vouched, voucher)
            return
        if message.oversized:  # the size plugin set a limit and did not answer: still refuse
            await self.send(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
            return
        if await self._client_gone() and not await self._continue_after_disconnect():
            log.info("queue id %s: client gone before storing: discarded", transaction.id)
            return
        if not self._settle_recipients(transaction):
            log.warning("queue id %s: plugins removed every recipient: stored nowhere",
                        transaction.id)
            await self.send(vouched or Reply(250, "2.0.0", f"OK: queued as {transaction.id}"),
                            voucher or "core")
            return
        result, plugin = await self.hooks.call("deliver", session=session,
                                                transaction=transaction, message=message)
        if isinstance(result, Reply):
            await self.send(result, plugin or "core")
            return
        if result is None or result is FAILED:
            log.error("queue id %s: no plugin delivered the message", transaction.id)
            await self.send(Reply(451, "4.3.0", "No delivery backend, try again later"))
            return
        session.messages_accepted += 1
        session.counters["messages"] += 1
        self.server.message_accepted(session, transaction, message)
        log.info(
            "accepted %s client=%s from=<%s> to=%s size=%d",
            transaction.id, session.peer_ip, transaction.mail_from,
            ",".join(f"<{r.address}>" for r in transaction.recipients), message.size,
        )
        # A plugin's positive answer to the message is sent only now, once it is stored.
        await self.send(vouched or Reply(250, "2.0.0", f"OK: queued as {transaction.id}"),
                        voucher or "core")
        self._flush()  # the client need not wait for what plugins do after delivery
        await self.hooks.call("after_delivery", session=session, transaction=transaction,
                                 message=message, delivered=result)

    def _settle_recipients(self, transaction: Transaction) -> bool:
        """Look up the recipients on_data plugins added (``local`` is None): one in a local
        domain without a mailbox is dropped with an error line (RCPT would have refused it).
        Whether any recipient is left."""
        directory = self.session.directory
        kept = []
        for rcpt in transaction.recipients:
            if rcpt.local is None:
                rcpt.local = directory.is_local_address(rcpt.address)
                if rcpt.local and not directory.mailbox_exists(rcpt.address):
                    log.error("queue id %s: a plugin added <%s>, which has no mailbox here: "
                              "not delivered to it", transaction.id, rcpt.address)
                    continue
            kept.append(rcpt)
        transaction.recipients[:] = kept
        return bool(kept)

    async def _client_gone(self) -> bool:
        """Whether the client's end of stream has been seen. A FIN or RST that arrived with
        or just after the final dot is read by the transport a loop turn later than the data,
        so give the loop two turns before answering."""
        for _ in range(2):
            if self._eof:
                break
            await asyncio.sleep(0)
        return self._eof

    async def _continue_after_disconnect(self) -> bool:
        decision, _ = await self.hooks.call("continue_after_disconnect", session=self.session)
        return decision is True

    async def cmd_rset(self, arg: str) -> None:
        self.session.transaction = None
        self._enter(GREETING if self.stage is GREETING else READY)
        await self.send(R_OK)

    async def cmd_noop(self, arg: str) -> None:
        await self.send(R_OK)

    async def cmd_quit(self, arg: str) -> None:
        await self.send(Reply(221, "2.0.0", f"{self.session.hostname} closing connection",
                              close=True))

    async def cmd_help(self, arg: str) -> None:
        await self.send(Reply(214, "2.0.0", "See RFC 5321; commands: " + " ".join(
            sorted(COMMANDS))))

    async def cmd_vrfy(self, arg: str) -> None:
        if not arg:
            await self.send(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        reply, plugin = await self.hooks.call("on_vrfy", session=self.session,
                                                address=query_argument(arg))
        await self.send(reply or Reply(
            252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"),
            plugin or "core")

    async def cmd_expn(self, arg: str) -> None:
        if not arg:
            await self.send(Reply(501, "5.5.4", "Syntax: EXPN address"))
            return
        reply, plugin = await self.hooks.call("on_expn", session=self.session,
                                                address=query_argument(arg))
        await self.send(reply or Reply(502, "5.5.1", "EXPN not available"), plugin or "core")

    async def cmd_starttls(self, arg: str) -> None:
        session = self.session
        context = self.server.tls_context
        if context is None or session.tls:
            code = 503 if session.tls else 502
            await self.send(Reply(code, "5.5.1", "STARTTLS not available"))
            return
        if arg:
            await self.send(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self.stage is GREETING:
            await self.send(R_NEED_HELO)
            return
        self._write(Reply(220, "2.0.0", "Ready to start TLS").wire())
        self._flush()
        # Whatever the client pipelined after STARTTLS in plaintext is discarded (RFC 3207 4.2;
        # cf. CVE-2021-38371, CVE-2024-34083): the input is emptied before the handshake.
        self.drop_input()
        self._set_phase(INPUT)
        self._plain = False
        try:
            transport = await self.loop.start_tls(self.transport, self, context,
                                                  server_side=True, ssl_handshake_timeout=60)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("session %s: TLS handshake failed: %s", session.id, exc)
            self.abort(None)
            return
        if transport is None:
            self.abort(None)
            return
        # No second emptying here: the client may send its first command together with its
        # last handshake message, and that command is already in the input, decrypted.
        self.transport = transport
        session.tls = True
        session.reset_smtp_state()
        self._enter(GREETING)

    async def cmd_auth(self, arg: str) -> None:
        session = self.session
        if not session.esmtp:
            await self.send(Reply(503, "5.5.1", "Send EHLO first"))
            return
        if session.auth_user is not None:
            await self.send(Reply(503, "5.5.1", "Already authenticated"))
            return
        if self.stage is not READY:
            await self.send(Reply(503, "5.5.1", "AUTH not allowed during a mail transaction"))
            return
        name, _, initial = arg.partition(" ")
        name = name.upper()
        if not name:
            await self.send(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        mechanisms = {m.name: m for m in await self.auth_mechanisms()}
        if not mechanisms:
            await self.send(Reply(502, "5.5.1", "AUTH not available"))
            return
        mechanism = mechanisms.get(name)
        if mechanism is None:
            await self.send(Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        reply, plugin = await self.hooks.call("on_auth", session=session, mechanism=name)
        if reply is not None and not reply.is_positive:  # vouched: the exchange still runs
            await self.send(reply, plugin)
            return
        try:
            first = None
            if initial:
                first = b"" if initial.strip() == "=" else sasl_response(initial.strip())
            user = await mechanism.authenticate(session, _Exchange(self), first)
        except AuthCancelled:
            await self.send(Reply(501, "5.7.0", "Authentication cancelled"))
            return
        except AuthSyntaxError:
            await self.send(Reply(501, "5.5.2", "Cannot decode response"))
            return
        except _Gone:
            return
        if user is None:
            await self.send(Reply(535, "5.7.8", "Authentication credentials invalid"))
            return
        session.auth_user = user
        await self.send(Reply(235, "2.7.0", "Authentication successful"))


COMMANDS = {
    "HELO": SMTPProtocol.cmd_helo, "EHLO": SMTPProtocol.cmd_helo, "MAIL": SMTPProtocol.cmd_mail,
    "RCPT": SMTPProtocol.cmd_rcpt, "DATA": SMTPProtocol.cmd_data, "RSET": SMTPProtocol.cmd_rset,
    "NOOP": SMTPProtocol.cmd_noop, "QUIT": SMTPProtocol.cmd_quit, "VRFY": SMTPProtocol.cmd_vrfy,
    "EXPN": SMTPProtocol.cmd_expn, "HELP": SMTPProtocol.cmd_help,
    "STARTTLS": SMTPProtocol.cmd_starttls, "AUTH": SMTPProtocol.cmd_auth,
    "BDAT": SMTPProtocol.cmd_bdat,
}


class _Gone(Exception):
    """The client went away (or timed out) during an AUTH exchange."""


class _Exchange:
    """The wire side of a SASL exchange, handed to a :class:`ingress.auth.Mechanism`."""

    def __init__(self, protocol: SMTPProtocol):
        self._protocol = protocol

    async def challenge(self, data: bytes) -> bytes:
        p = self._protocol
        p._write(b"334 " + base64.b64encode(data) + b"\r\n")
        p._last_reply = p.loop.time()
        line = await p._read_command_input()
        if line is None:
            raise _Gone()
        if line is TOO_LONG:
            raise AuthSyntaxError()
        return sasl_response(line.decode("ascii", "replace").strip())

    @property
    def closed(self) -> bool:
        transport = self._protocol.transport
        return transport is None or transport.is_closing()
