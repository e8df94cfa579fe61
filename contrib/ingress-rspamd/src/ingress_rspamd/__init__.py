"""ingress plugin ``rspamd``: ask rspamd about every message at the end of DATA.

The message goes to rspamd's normal worker (``POST /checkv2``) with the envelope as rspamd's
request headers (``IP``, ``Helo``, ``From``, one ``Rcpt`` per recipient, ``User``, ``Queue-Id``);
its body is streamed from the spool in chunks (HTTP/1.1 chunked transfer coding), never held
whole in memory. rspamd's action decides: ``reject`` refuses with ``550 5.7.1``, ``soft reject``
and ``greylist`` with ``451 4.7.1``, ``rewrite subject`` replaces the Subject, ``add header``
marks the message ``X-Spam: yes``. rspamd down, slower than ``timeout`` or answering nonsense:
``on_error`` says whether the message goes on (``X-Spam-Action: unchecked``) or gets ``451``.

The HTTP client is a small one of its own on asyncio streams: one request per connection to a
local daemon needs no more, and the plugin then needs no package beyond ingress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from email.header import Header
from importlib import resources
from urllib.parse import urlsplit

from ingress import Reply, hookimpl, ipnets

log = logging.getLogger("ingress_rspamd")

NAME = "rspamd"
REJECT = Reply(550, "5.7.1", "Message rejected as spam")
TRY_LATER = Reply(451, "4.7.1", "Try again later")
MAX_ANSWER = 1 << 20  # bytes of rspamd's answer read at most (a real one is a few KiB)
CHUNK = 1 << 16
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # never inside a request header value


class RspamdError(Exception):
    """rspamd could not be asked, or its answer could not be read."""


@hookimpl
def config_schema():
    return json.loads(resources.files(__name__).joinpath("schema.json").read_text("utf-8"))


@hookimpl
async def on_data(session, transaction, message, settings):
    if message.oversized or message.failed:
        return None  # nothing kept to scan; the core refuses such a message itself
    timeout = settings["timeout"]
    try:
        answer = await asyncio.wait_for(check(session, transaction, message, settings["url"]),
                                        timeout)
        action = answer.get("action")
        if action not in ACTIONS:
            raise RspamdError(f"unknown action {action!r}")
        score = float(answer.get("score", 0.0))
    except (asyncio.TimeoutError, OSError, RspamdError, ValueError, TypeError) as exc:
        why = _why(exc, timeout)
        if settings["on_error"] == "tempfail":
            log.warning("rspamd: %s: %s failed (%s); answering 451", transaction.id,
                        settings["url"], why)
            return TRY_LATER
        log.warning("rspamd: %s: %s failed (%s); accepting the message unchecked",
                    transaction.id, settings["url"], why)
        _set_header(transaction, message, "X-Spam-Action", "unchecked")
        return None
    log.info("rspamd: %s: %s (score %.2f)", transaction.id, action, score)
    return decide(transaction, message, settings, answer, action, score)


def _why(exc: Exception, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # the same words on asyncio's loop and uvloop
    return str(exc) or type(exc).__name__


# --- what each action does ------------------------------------------------------------------


ACTIONS = ("no action", "add header", "rewrite subject", "greylist", "soft reject", "reject")


def decide(transaction, message, settings, answer: dict, action: str, score: float):
    """Do what *action* says: a reply, or edits of the accepted message."""
    if action == "reject":
        return REJECT
    if action in ("soft reject", "greylist"):
        return TRY_LATER
    if action == "rewrite subject" and isinstance(answer.get("subject"), str):
        message.change_header("Subject", _encoded(answer["subject"]))
    if settings["headers"]:
        _set_header(transaction, message, "X-Spam-Score", f"{score:.2f}")
        _set_header(transaction, message, "X-Spam-Action", action)
    if settings["headers"] or action == "add header":
        _set_header(transaction, message, "X-Spam", "no" if action == "no action" else "yes")
    return None


def _set_header(transaction, message, name: str, value: str) -> None:
    """Our *name* header, and no other of that name: a sender's own X-Spam headers would
    otherwise speak for rspamd."""
    for _ in range(message.header_count(name)):
        message.remove_header(name)
    transaction.add_header(name, value)


def _encoded(text: str) -> str:
    """*text* as a header value: RFC 2047 when it is not ASCII (rspamd answers decoded)."""
    text = _UNSAFE.sub(" ", text)
    return text if text.isascii() else Header(text, "utf-8").encode()


# --- the HTTP exchange ----------------------------------------------------------------------


def request_head(session, transaction, url: str) -> bytes:
    """The request line and headers: the envelope, as rspamd's own request headers."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/checkv2"
    host = parts.netloc
    envelope = [("Host", host)]
    address = ipnets.client_ip(session.peer_ip)
    if address is not None:
        envelope.append(("IP", str(address)))
    if session.helo:
        envelope.append(("Helo", session.helo))
    envelope.append(("From", transaction.mail_from or "<>"))
    envelope += [("Rcpt", r.address) for r in transaction.recipients]
    if session.auth_user:
        envelope.append(("User", session.auth_user))
    envelope += [("Queue-Id", transaction.id), ("Transfer-Encoding", "chunked"),
                 ("Connection", "close")]
    lines = [f"POST {path} HTTP/1.1"]
    lines += [f"{name}: {_UNSAFE.sub('', value)}" for name, value in envelope]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def added_headers(transaction) -> bytes:
    """What the server puts above the received message (``Received:``, ...), as delivered."""
    lines = []
    for name, value in transaction.added_headers:
        value = re.sub(r"\r\n(?![ \t])", "\r\n ", re.sub(r"\r\n|\r|\n", "\r\n", value))
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


async def check(session, transaction, message, url: str) -> dict:
    """rspamd's JSON answer for the message."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        writer.write(request_head(session, transaction, url))
        trace = added_headers(transaction)
        if trace:
            writer.write(b"%x\r\n%s\r\n" % (len(trace), trace))
        # A local spool file: reads are short and do not wait on the network.
        for chunk in message.chunks(CHUNK):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return await read_answer(reader)
    finally:
        # abort, not close: close() would wait to flush an upload rspamd never reads, and a
        # timeout's cancellation would wait for that (a hung session).
        writer.transport.abort()


async def read_answer(reader: asyncio.StreamReader) -> dict:
    try:
        status = await reader.readuntil(b"\r\n")
        fields = status.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1."):
            raise RspamdError("not an HTTP answer")
        head = b"" if status.endswith(b"\r\n\r\n") else await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise RspamdError("connection closed before an answer") from exc
    except asyncio.LimitOverrunError as exc:
        raise RspamdError("answer header too long") from exc
    if fields[1] != b"200":
        raise RspamdError(f"HTTP status {fields[1].decode('ascii', 'replace')}")
    headers = {}
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding", b"identity") != b"identity":
        body = await _read_chunked(reader)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if length > MAX_ANSWER:
            raise RspamdError("answer too long")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise RspamdError("answer cut short") from exc
    else:
        body = await reader.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER:
            raise RspamdError("answer too long")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RspamdError("answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise RspamdError("answer is not a JSON object")
    return answer


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return bytes(body)
            if len(body) + size > MAX_ANSWER:
                raise RspamdError("answer too long")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise RspamdError("answer cut short") from exc
