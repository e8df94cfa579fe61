"""The message being received: bounded memory, spilled to a file on the spool's disk.

Plugins may import :class:`Message` for type hints. The core writes the unstuffed DATA bytes with
:meth:`Message.write` as they arrive; past :data:`MEMORY_LIMIT` they go to a temporary file in the
spool folder (on the queue's disk, never a RAM file system). Past ``data_limit`` nothing more is
kept at all: the message is marked ``oversized`` and only counted. A write that fails (disk
full, permission) drops what was kept and sets ``failed``; the rest is only counted, and the core
answers ``451 4.3.0`` after the final dot.

``on_data`` plugins may edit the received message (headers by name and occurrence, the whole
body); the received bytes are never rewritten: edits are kept beside them and every read
(:meth:`Message.chunks`, :meth:`Message.open`, :meth:`Message.getvalue`, :meth:`Message.head`,
:meth:`Message.headers`) gives the message as edited so far. See docs/hooks.md.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from email.header import decode_header, make_header
from pathlib import Path
from typing import BinaryIO

MEMORY_LIMIT = 1 << 20  # bytes kept in memory before spilling to disk
HEADER_LIMIT = 1 << 20  # bytes of header block parsed by headers()
_FIELD_NAME_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but the colon


def _write_all(file: BinaryIO, data) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _split_fields(block: bytes) -> list[bytes]:
    """The raw lines of a header block (whole lines, without the empty line that ends it), a
    field with its folded continuation lines as one entry; a line that is not a field is an
    entry of its own."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n")[:-1] if block else []:
        line += b"\r\n"
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _parse_field(raw: bytes) -> tuple[str, str] | None:
    """``(name, unfolded raw value)`` of one entry of :func:`_split_fields`, or ``None`` for a
    line that is not a field (no colon, a space inside the name). Whitespace between name and
    colon is allowed (RFC 5322 4.5.3, obsolete syntax); 8-bit bytes are kept (surrogateescape)."""
    name, colon, value = raw.decode("utf-8", "surrogateescape").partition(":")
    name = name.rstrip(" \t")
    if not colon or not name or " " in name or "\t" in name:
        return None
    first, *more = value.split("\r\n")[:-1]
    return name, first.strip() + "".join(" " + line.strip() for line in more)


class Message:
    def __init__(self, spool_dir: Path, data_limit: int | None):
        self._spool_dir = spool_dir
        self._limit = data_limit
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self.size = 0  # bytes received (after dot-unstuffing), kept or not
        self.oversized = False
        self.failed: OSError | None = None  # storing failed: nothing is kept
        self._headers: list[tuple[str, str]] | None = None
        # Edits (see "editing" below): the header block as raw field lines once a header was
        # edited, where the received body starts, and a replacement body.
        self._fields: list[bytes] | None = None
        self._head_end = 0
        self._new_body: Message | None = None

    # --- writing (the core) ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.oversized:
            return
        if self._limit is not None and self.size > self._limit:
            self.oversized = True
            self.discard()
            return
        if self.failed:
            return
        try:
            if self._file is not None:
                _write_all(self._file, data)
                return
            self._buffer += data
            if len(self._buffer) > MEMORY_LIMIT:
                self._spill()
        except OSError as exc:
            self.failed = exc
            self.discard()

    def _spill(self) -> None:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="data-", dir=self._spool_dir)
        self._path = name  # removed by discard(); the server empties the folder at start
        # Unbuffered: a full disk shows in write(), never later in a flush or close.
        self._file = os.fdopen(fd, "w+b", buffering=0)
        _write_all(self._file, self._buffer)
        self._buffer = bytearray()

    def discard(self) -> None:
        """Drop everything kept (the size counter goes on)."""
        if self._new_body is not None:
            self._new_body.discard()
            self._new_body = None
        self._fields = None
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    close = discard

    # --- reading (plugins, delivery) --------------------------------------------------------

    @property
    def edited(self) -> bool:
        """Whether a plugin changed a header or the body."""
        return self._fields is not None or self._new_body is not None

    @property
    def in_memory(self) -> bool:
        if self._new_body is not None:  # the received body is no longer read
            return self._new_body.in_memory
        return self._file is None

    def getvalue(self) -> bytes | None:
        """The whole message when it is held in memory, else ``None`` (use :meth:`open`)."""
        if not self.edited:
            return bytes(self._buffer) if self._file is None else None
        if not self.in_memory:
            return None
        return b"".join(self.chunks(max(self.size, 1) + (1 << 16)))

    def open(self) -> BinaryIO:
        """A new binary reader positioned at the start of the message."""
        if not self.edited:
            if self._file is None:
                return io.BytesIO(self._buffer)
            return open(self._path, "rb")  # noqa: SIM115 - the caller closes it
        return io.BufferedReader(_ChunkReader(self.chunks()))

    def chunks(self, size: int = 1 << 16):
        """Iterate over the message in chunks of at most *size* bytes (the header block, when
        edited, comes as one chunk of its own)."""
        if not self.edited:
            yield from self._received_chunks(size)
            return
        yield self.head()
        if self._new_body is not None:
            yield from self._new_body.chunks(size)
        else:
            yield from self._received_chunks(size, self._head_end)

    def _received_chunks(self, size: int, start: int = 0):
        if self._file is None:
            view = memoryview(self._buffer)
            for i in range(start, len(view), size):
                yield bytes(view[i:i + size])
            return
        with open(self._path, "rb") as f:
            f.seek(start)
            while chunk := f.read(size):
                yield chunk

    def _received_head(self, limit: int = HEADER_LIMIT) -> bytes:
        if self._file is None:
            data = bytes(self._buffer[:limit])
        else:
            with open(self._path, "rb") as f:
                data = f.read(limit)
        end = data.find(b"\r\n\r\n")
        if data.startswith(b"\r\n"):
            return b"\r\n"
        return data if end < 0 else data[:end + 4]

    def head(self, limit: int = HEADER_LIMIT) -> bytes:
        """The header block (up to and including the empty line), at most *limit* bytes."""
        if self._fields is None:
            return self._received_head(limit)
        return (b"".join(self._fields) + b"\r\n")[:limit]

    def headers(self) -> list[tuple[str, str]]:
        """The top-level header fields as ``(name, value)``, unfolded, in order, as edited so
        far. Values are raw: encoded words (RFC 2047) stay encoded; see :meth:`decoded_headers`.

        Tolerant: lines that are not fields (no colon, a space inside the name) are skipped,
        whitespace between name and colon is allowed (RFC 5322 4.5.3, obsolete syntax), 8-bit
        bytes are kept (surrogateescape).
        """
        if self._headers is None:
            head = self.head()
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                block = head[:end + 2]
            else:  # no empty line (within the limit): every line is a header line
                block = head if head.endswith(b"\r\n") else head + b"\r\n"
            parsed = map(_parse_field, _split_fields(block))
            self._headers = [field for field in parsed if field is not None]
        return self._headers

    def decoded_headers(self) -> list[tuple[str, str]]:
        """:meth:`headers` with encoded words (RFC 2047, ``=?utf-8?q?...?=``) decoded. A value
        whose encoded words are broken is given raw."""
        decoded = []
        for name, value in self.headers():
            if "=?" in value:
                try:
                    value = str(make_header(decode_header(value)))
                except (ValueError, LookupError, UnicodeError):
                    pass
            decoded.append((name, value))
        return decoded

    def header_count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers() if n.lower() == lname)

    # --- editing (on_data plugins) ----------------------------------------------------------
    # The header block is split once into its raw field lines (a field with its folded
    # continuation lines is one entry; a line that is not a field is kept as an entry of its
    # own); edits change that list, and reads render it. Unchanged fields keep their bytes.

    def _editable_fields(self) -> list[bytes]:
        if self._fields is None:
            head = self._received_head()
            self._head_end = len(head)
            if head.endswith(b"\r\n\r\n") or head == b"\r\n":
                head = head[:-2]  # the empty line; head() puts it back
            else:
                # No end of the header block within HEADER_LIMIT (or none at all): the
                # header block is its whole lines, and anything after them stays as received.
                cut = head.rfind(b"\r\n") + 2
                self._head_end, head = cut, head[:cut]
            self._fields = _split_fields(head)
        return self._fields

    def _edited(self) -> None:
        self._headers = None

    @staticmethod
    def _field(name: str, value: str) -> bytes:
        if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        value = re.sub(r"\r\n|\r|\n", "\r\n", str(value))
        value = re.sub(r"\r\n(?![ \t])", "\r\n ", value)  # CR/LF only as folding
        return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")

    def _positions(self, name: str) -> list[int]:
        """Indexes in the field list of the fields called *name* (case-insensitive)."""
        lname = name.lower().encode("ascii", "replace")
        found = []
        for i, raw in enumerate(self._editable_fields()):
            field_name, colon, _ = raw.partition(b":")
            if colon and field_name.rstrip(b" \t").lower() == lname:
                found.append(i)
        return found

    def append_header(self, name: str, value: str) -> None:
        """Add ``name: value`` at the end of the received header block."""
        self._editable_fields().append(self._field(name, value))
        self._edited()

    def insert_header(self, position: int, name: str, value: str) -> None:
        """Insert ``name: value`` before the received header field at *position* (0: the top
        of the received block, below the headers added with ``transaction.add_header``); a
        position past the end appends."""
        if position < 0:
            raise ValueError("position must be 0 or more")
        self._editable_fields().insert(position, self._field(name, value))
        self._edited()

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Replace the value of the *index*-th field called *name* (1: the first, counting
        fields of that name, case-insensitively); when there are fewer, add the field at the
        end of the header block."""
        if index < 1:
            raise ValueError("index counts from 1")
        field = self._field(name, value)
        found = self._positions(name)
        if index <= len(found):
            self._fields[found[index - 1]] = field
        else:
            self._fields.append(field)
        self._edited()

    def remove_header(self, name: str, index: int = 1) -> bool:
        """Remove the *index*-th field called *name* (1: the first); whether there was one."""
        if index < 1:
            raise ValueError("index counts from 1")
        found = self._positions(name)
        if index > len(found):
            return False
        del self._fields[found[index - 1]]
        self._edited()
        return True

    def remove_headers(self, name: str, where: Callable[[str], bool] | None = None) -> int:
        """Remove every field called *name* (case-insensitive) whose unfolded raw value
        satisfies *where* (every one without it), in one pass over the header block; how many
        were removed."""
        lname = name.lower()
        kept, removed = [], 0
        for raw in self._editable_fields():
            field = _parse_field(raw)
            if field is not None and field[0].lower() == lname and (where is None
                                                                   or where(field[1])):
                removed += 1
            else:
                kept.append(raw)
        if removed:
            self._fields = kept
            self._edited()
        return removed

    def replace_body(self, body: bytes | BinaryIO | Iterable[bytes]) -> None:
        """Replace everything after the header block with *body*: bytes, a binary file object
        (read in pieces) or an iterable of byte strings. It is spooled like the received message
        (memory, then a file), within the same size limit (``ValueError`` past it). Lines must
        end in CRLF, as the received ones do: the core does not convert them."""
        self._editable_fields()
        new = Message(self._spool_dir, self._limit)
        try:
            if isinstance(body, (bytes, bytearray, memoryview)):
                new.write(bytes(body))
            elif hasattr(body, "read"):
                while piece := body.read(1 << 16):
                    new.write(piece)
                    if new.oversized:
                        break
            else:
                for piece in body:
                    new.write(piece)
                    if new.oversized:
                        break
            if new.oversized:
                raise ValueError("the new body is larger than the message size limit")
            if new.failed is not None:
                raise new.failed
        except BaseException:
            new.discard()
            raise
        if self._new_body is not None:
            self._new_body.discard()
        self._new_body = new


class _ChunkReader(io.RawIOBase):
    """A read-only stream over an iterator of byte strings (the edited message for open())."""

    def __init__(self, chunks) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # a generator closes the file it reads
        super().close()
