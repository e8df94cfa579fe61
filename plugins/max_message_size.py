"""max_message_size: EHLO ``SIZE <n>``, ``MAIL SIZE=`` and the end-of-DATA measurement, where
with ``base64_allowance`` every base64 body part counts at its decoded size.

n (the advertised and enforced raw limit) is ``kb * 1024``, or ``floor(kb * 1024 * 1.37)`` with
the allowance. The plugin sets ``transaction.data_limit = n`` at MAIL, so the core never keeps
more than n bytes of a message (past n it only counts them and the message is ``oversized``).
The measurement streams the message (:class:`Base64Measure`) in a thread of its own; it never
holds the message whole, and its work is linear in the message size and capped.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from email.parser import BytesHeaderParser
from email.policy import compat32

import ingress_schemas
from ingress import Reply, hookimpl

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")

B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(sorted(set(range(256)) - set(B64_ALPHABET)))
LINE_PREFIX = 1000  # of a line that may matter (header, boundary); boundaries are far shorter
HEADER_LIMIT = 1 << 16  # bytes of an entity's Content-Type and Content-Transfer-Encoding kept
MAX_DEPTH = 64  # nested multiparts followed; a deeper one is opaque: its body counts raw
# The walk's work is counted in units of about one line handled in Python (a header block costs
# HEADER_COST more). Past BUDGET units the structure is no longer followed and the rest of the
# message counts raw, so a message made to be slow (millions of "--" lines or empty parts)
# costs a bounded amount of CPU; the scanning in between is done by bytes methods, in C.
BUDGET = 200_000
HEADER_COST = 16
_RELEVANT = (b"content-type", b"content-transfer-encoding")
_TEXT, _MULTIPART, _MESSAGE = 0, 1, 2


@hookimpl
def config_schema():
    return ingress_schemas.load("max_message_size")


def raw_limit(settings) -> int:
    """n: the advertised limit on the raw message."""
    size = settings["kb"] * 1024
    return size * 137 // 100 if settings["base64_allowance"] else size


@hookimpl
def ehlo_keywords(settings):
    return [f"SIZE {raw_limit(settings)}"]


@hookimpl
def on_mail_from(transaction, settings):
    limit = raw_limit(settings)
    transaction.data_limit = limit
    declared = transaction.mail_params.get("SIZE") or ""
    if declared.isdigit() and int(declared) > limit:  # syntax was checked by the core
        return TOO_BIG
    return None


@hookimpl
def on_data(message, settings):
    if message.oversized or message.size > raw_limit(settings):
        return TOO_BIG
    limit = settings["kb"] * 1024
    if message.size <= limit:  # decoding only ever makes a message smaller
        return None
    if not settings["base64_allowance"]:
        return TOO_BIG
    return measure_in_thread(message, limit)  # awaited by the core


# One thread of its own rather than asyncio's default pool: the deliveries of every session
# run in that pool, and measurements must never keep them waiting. A single thread, because
# the walk holds the GIL most of the time (a second one would not add CPU) and each measurement
# is short; the event loop keeps its turn at every GIL switch interval.
_executor: ThreadPoolExecutor | None = None


def _forget_executor() -> None:
    global _executor
    _executor = None  # a forked worker process does not have the parent's thread


os.register_at_fork(after_in_child=_forget_executor)


async def measure_in_thread(message, limit: int):
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(1, thread_name_prefix="ingress-measure")
    measured = await asyncio.get_running_loop().run_in_executor(_executor, measure, message)
    return TOO_BIG if measured > limit else None


def measure(message) -> int:
    counter = Base64Measure()
    for chunk in message.chunks():
        counter.feed(chunk)
    return counter.finish()


@functools.lru_cache(maxsize=512)
def content_kind(fields: bytes) -> tuple[int, bytes | None, bool]:
    """(kind, multipart boundary, base64?) from an entity's Content-Type and
    Content-Transfer-Encoding fields, parsed tolerantly by :mod:`email` (``compat32``)."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(fields)
    ctype = parsed.get_content_type()
    base64 = str(parsed.get("Content-Transfer-Encoding", "")).strip().lower() == "base64"
    if ctype.startswith("multipart/"):
        boundary = parsed.get_boundary()
        return _MULTIPART, boundary.encode("utf-8", "surrogateescape") if boundary else None, False
    if ctype in ("message/rfc822", "message/global") and not base64:
        return _MESSAGE, None, False
    return _TEXT, None, base64


class Base64Measure:
    """The size of a message with each base64 body part counted at its decoded size.

    Fed in chunks of any size (the result does not depend on how the message is cut); memory
    stays bounded whatever the message. A MIME walk of our own in one pass: the Content-Type
    and Content-Transfer-Encoding of each entity (the message, each body part, each enclosed
    ``message/rfc822``) are parsed; in a body, only lines starting with ``--`` are looked at,
    one dictionary lookup each against the boundaries of all open multiparts (so a line closes
    the innermost multipart it belongs to, and any open inside it); in a base64 body only the
    base64 alphabet is counted (decoded = characters * 3 // 4). Malformed MIME (missing
    boundaries, unterminated parts, garbage) counts as text. ``work`` counts the units spent.
    """

    def __init__(self) -> None:
        self.size = 0  # raw bytes fed
        self.work = 0
        self._encoded = 0  # raw bytes of finished base64 bodies
        self._decoded = 0  # their decoded size
        self._part_raw = self._part_chars = 0  # the base64 body being read
        self._boundaries: list[bytes] = []  # of the open multiparts, outermost first
        self._depth: dict[bytes, int] = {}  # boundary -> its index (the innermost if repeated)
        self._in_header = True
        self._fields = bytearray()  # Content-Type and Content-Transfer-Encoding lines
        self._relevant = False  # the header field being read is one of those
        self._base64 = False
        self._carry = b""  # a line start shorter than LINE_PREFIX, waiting for its end
        self._midline = False  # inside a line whose start was already handled

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if not self._in_header and not self._depth:  # nothing can end this body: all text
            if self._carry:
                self._text(self._carry, 0, len(self._carry))
                self._carry = b""
            self._text(data, 0, len(data))
            return
        if self._carry:
            data, self._carry = self._carry + data, b""
        end = len(data)
        cut = data.rfind(b"\n") + 1
        if cut < end and end - cut < LINE_PREFIX and (cut or not self._midline):
            self._carry = data[cut:]
            end = cut
        self._scan(data, end)

    def finish(self) -> int:
        """End of the message: the measured size."""
        if self._carry:
            carry, self._carry = self._carry, b""
            self._scan(carry, len(carry))
        self._end_body()
        return self.size - self._encoded + self._decoded

    def _scan(self, data: bytes, end: int) -> None:
        pos = 0
        while pos < end:
            if self._midline:
                newline = data.find(b"\n", pos, end)
                stop = end if newline < 0 else newline + 1
                self._text(data, pos, stop)
                self._midline = newline < 0
                pos = stop
                continue
            if not self._in_header:
                if not self._depth:
                    self._text(data, pos, end)
                    return
                if not data.startswith(b"--", pos):
                    # Bulk: all text up to the next line that starts with "--".
                    self.work += 1
                    found = data.find(b"\n--", pos, end)
                    stop = end if found < 0 else found + 1
                    self._text(data, pos, stop)
                    self._midline = data[stop - 1] != 0x0A
                    pos = stop
                    continue
                # The common case of a "--" line that is no boundary, inline: one lookup.
                newline = data.find(b"\n", pos, min(end, pos + LINE_PREFIX))
                if newline >= 0:
                    key = data[pos + 2:newline].rstrip(b" \t\r")
                    if key not in self._depth and key[:-2] not in self._depth:
                        self.work += 1
                        if self.work > BUDGET:
                            self._give_up()
                            continue
                        self._text(data, pos, newline + 1)
                        pos = newline + 1
                        continue
            # A header line, or a body line that starts with "--".
            self.work += 1
            if self.work > BUDGET:
                self._give_up()
                continue
            newline = data.find(b"\n", pos, min(end, pos + LINE_PREFIX))
            if newline >= 0 or end - pos < LINE_PREFIX:  # (no newline: the message's end)
                stop = end if newline < 0 else newline + 1
                self._line(data[pos:stop], complete=True)
            else:  # too long to matter whole
                stop = pos + LINE_PREFIX
                self._line(data[pos:stop], complete=False)
                self._midline = True
            pos = stop

    def _text(self, data: bytes, start: int, stop: int) -> None:
        """Body text (or the rest of an over-long header line, which is dropped)."""
        if self._base64 and not self._in_header:
            self._part_raw += stop - start
            self._part_chars += len(data[start:stop].translate(None, _NOT_B64))

    def _line(self, line: bytes, complete: bool) -> None:
        if complete and self._depth and line.startswith(b"--") and self._boundary(line):
            return
        if not self._in_header:
            self._text(line, 0, len(line))
        elif line in (b"\r\n", b"\n"):
            self._headers_done()
        elif line[:1] in (b" ", b"\t"):  # a folded field goes on
            if self._relevant and len(self._fields) < HEADER_LIMIT:
                self._fields += line if complete else line + b"\r\n"
        elif b":" in line:
            name = line.split(b":", 1)[0].strip().lower()
            self._relevant = name in _RELEVANT
            if self._relevant and len(self._fields) < HEADER_LIMIT:
                self._fields += line if complete else line + b"\r\n"
        else:  # not a header line: the header block ended without its empty line
            self._headers_done()
            self._text(line, 0, len(line))

    def _boundary(self, line: bytes) -> bool:
        """A delimiter of an open multipart (the innermost that matches)?"""
        key = line.rstrip(b" \t\r\n")[2:]
        depth = self._depth.get(key, -1)
        closing = key.endswith(b"--") and self._depth.get(key[:-2], -1) > depth
        if closing:
            depth = self._depth[key[:-2]]
        elif depth < 0:
            return False
        self._end_body()
        keep = depth if closing else depth + 1  # unclosed inner multiparts end too
        if keep < len(self._boundaries):
            del self._boundaries[keep:]
            self._depth = {b: i for i, b in enumerate(self._boundaries)}
            self.work += keep
        if closing:  # the epilogue: text of the enclosing part
            self._in_header, self._base64 = False, False
        else:  # a body part starts with its header
            self._in_header, self._relevant = True, False
            self._fields.clear()
        return True

    def _give_up(self) -> None:
        """Stop following the structure: the rest counts as text."""
        self._end_body()
        self._boundaries.clear()
        self._depth.clear()
        self._in_header = False

    def _headers_done(self) -> None:
        self.work += HEADER_COST
        kind, boundary, base64 = content_kind(bytes(self._fields))
        self._fields.clear()
        self._in_header, self._base64 = False, False
        if kind == _MULTIPART:
            if boundary and len(self._boundaries) < MAX_DEPTH:
                self._depth[boundary] = len(self._boundaries)
                self._boundaries.append(boundary)
        elif kind == _MESSAGE:
            self._in_header, self._relevant = True, False  # the enclosed message's header
        else:
            self._base64 = base64

    def _end_body(self) -> None:
        if self._base64:
            self._encoded += self._part_raw
            self._decoded += self._part_chars * 3 // 4
        self._part_raw = self._part_chars = 0
        self._base64 = False
