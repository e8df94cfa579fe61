"""max_message_size: EHLO ``SIZE <n>``, ``MAIL SIZE=`` and the end-of-DATA measurement, where
with ``base64_allowance`` every base64 body part counts at its decoded size.

n (the advertised and enforced raw limit) is ``kb * 1024``, or ``floor(kb * 1024 * 1.37)`` with
the allowance. The plugin sets ``transaction.data_limit = n`` at MAIL, so the core never keeps
more than n bytes of a message (past n it only counts them and the message is ``oversized``).
The measurement streams the spooled message (:class:`Base64Measure`); it never holds it whole.
"""

from __future__ import annotations

import asyncio
from email.parser import BytesHeaderParser
from email.policy import compat32

import ingress_schemas
from ingress import Reply, hookimpl

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")

B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(sorted(set(range(256)) - set(B64_ALPHABET)))
LINE_PREFIX = 1000  # of a line that may matter (header, boundary); boundaries are far shorter
HEADER_LIMIT = 1 << 16  # bytes of one entity's header block that are parsed
MAX_DEPTH = 64  # nested multiparts followed; deeper ones count as plain text
# Work allowed for the line-by-line MIME walk (a line costs 1, a header block 50): a message
# made to be slow (millions of "--" lines or empty parts) then simply counts as text.
BUDGET = 2_000_000
HEADER, BODY = "header", "body"


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
    if message.in_memory:
        return TOO_BIG if measure(message) > limit else None
    return measure_spooled(message, limit)  # awaited by the core


async def measure_spooled(message, limit: int):
    """Reading a big spool file must not stall the other sessions: measure in a thread."""
    return TOO_BIG if await asyncio.to_thread(measure, message) > limit else None


def measure(message) -> int:
    counter = Base64Measure()
    for chunk in message.chunks():
        counter.feed(chunk)
    return counter.finish()


class Base64Measure:
    """The size of a message with each base64 body part counted at its decoded size.

    Fed in chunks of any size; memory stays bounded whatever the message (lines of any length,
    any nesting). A MIME walk of our own rather than :mod:`email`, which holds the whole
    message: headers of each entity are parsed (tolerantly, by :mod:`email`), multipart
    boundaries are followed, including nested ones and ``message/rfc822`` parts; in a base64
    body only the base64 alphabet is counted (decoded = characters * 3 // 4). Malformed MIME
    (missing boundaries, unterminated parts, garbage) just counts as text.
    """

    def __init__(self) -> None:
        self.size = 0  # raw bytes fed
        self._encoded = 0  # raw bytes of finished base64 bodies
        self._decoded = 0  # their decoded size
        self._part_raw = self._part_chars = 0  # the base64 body being read
        self._boundaries: list[bytes] = []  # open multiparts, outermost first
        self._state = HEADER
        self._header = bytearray()
        self._base64 = False
        self._carry = b""  # start of a line that may matter, waiting for its end
        self._midline = False  # inside a line whose start was already handled
        self._budget = BUDGET

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self._carry:
            data, self._carry = self._carry + data, b""
        pos, end = 0, len(data)
        while pos < end:
            if self._midline:
                newline = data.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                self._text(data, pos, stop)
                self._midline = newline < 0
            elif self._state == BODY and not self._boundaries:
                stop = end  # nothing can end this body: all of it is text
                self._text(data, pos, stop)
            elif self._state == BODY and not data.startswith(b"--", pos):
                if data[pos:] == b"-":
                    self._carry = b"-"
                    return
                # Bulk: all text up to the next line that starts with "--".
                found = data.find(b"\n--", pos)
                stop = end if found < 0 else found + 1
                if found < 0 and data.endswith(b"\n-"):
                    stop = end - 1
                self._text(data, pos, stop)
                self._midline = data[stop - 1] != 0x0A
            else:  # a header line, or a body line starting with "--"
                newline = data.find(b"\n", pos)
                if newline < 0 and end - pos < LINE_PREFIX:
                    self._carry = data[pos:]
                    return
                if newline < 0 or newline - pos >= LINE_PREFIX:  # too long to matter whole
                    stop = pos + LINE_PREFIX
                    self._line(data[pos:stop], complete=False)
                    self._midline = True
                else:
                    stop = newline + 1
                    self._line(data[pos:stop], complete=True)
            pos = stop

    def finish(self) -> int:
        """End of the message: the measured size."""
        if self._carry:
            carry, self._carry = self._carry, b""
            self._line(carry, complete=True)
        self._end_body()
        return self.size - self._encoded + self._decoded

    # --- lines --------------------------------------------------------------------------------

    def _text(self, data: bytes, start: int, stop: int) -> None:
        """Body text (or the rest of an over-long header line, which is dropped)."""
        if self._state == BODY and self._base64:
            self._part_raw += stop - start
            self._part_chars += len(data[start:stop].translate(None, _NOT_B64))

    def _line(self, line: bytes, complete: bool) -> None:
        self._budget -= 1
        if self._budget < 0:
            self._give_up()
        if complete and self._boundaries and line.startswith(b"--") and self._boundary(line):
            return
        if self._state == BODY:
            self._text(line, 0, len(line))
        elif line in (b"\r\n", b"\n"):
            self._headers_done()
        elif line[:1] in (b" ", b"\t") or b":" in line:
            if len(self._header) < HEADER_LIMIT:
                self._header += line if complete else line + b"\r\n"
        else:  # not a header line: the header block ended without its empty line
            self._headers_done()
            self._text(line, 0, len(line))

    def _boundary(self, line: bytes) -> bool:
        """A delimiter of an open multipart (the innermost that matches)?"""
        text = line.rstrip(b" \t\r\n")
        for depth in range(len(self._boundaries) - 1, -1, -1):
            delimiter = b"--" + self._boundaries[depth]
            if text == delimiter or text == delimiter + b"--":
                break
        else:
            return False
        self._end_body()
        closing = text != delimiter
        del self._boundaries[depth + (0 if closing else 1):]  # unclosed inner parts end too
        if closing:  # the epilogue: text of the enclosing part
            self._state, self._base64 = BODY, False
        else:  # a body part starts with its header
            self._state = HEADER
            self._header.clear()
        return True

    def _give_up(self) -> None:
        """Stop following the structure: the rest counts as text."""
        self._end_body()
        self._boundaries.clear()
        self._state = BODY

    def _headers_done(self) -> None:
        self._budget -= 50
        fields = BytesHeaderParser(policy=compat32).parsebytes(bytes(self._header))
        self._header.clear()
        ctype = fields.get_content_type()
        encoding = str(fields.get("Content-Transfer-Encoding", "")).strip().lower()
        self._state, self._base64 = BODY, False
        if ctype.startswith("multipart/"):
            boundary = fields.get_boundary()
            if boundary and len(self._boundaries) < MAX_DEPTH:
                self._boundaries.append(boundary.encode("utf-8", "surrogateescape"))
        elif ctype in ("message/rfc822", "message/global") and encoding != "base64":
            self._state = HEADER  # the enclosed message's own header follows
        else:
            self._base64 = encoding == "base64"

    def _end_body(self) -> None:
        if self._base64:
            self._encoded += self._part_raw
            self._decoded += self._part_chars * 3 // 4
        self._part_raw = self._part_chars = 0
        self._base64 = False
