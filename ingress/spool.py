"""The message being received: bounded memory, spilled to a file on the spool's disk.

Plugins may import :class:`Message` for type hints. The core writes the unstuffed DATA bytes with
:meth:`Message.write` as they arrive; past :data:`MEMORY_LIMIT` they go to a temporary file in the
spool folder (on the queue's disk, never a RAM file system). Past ``data_limit`` nothing more is
kept at all: the message is marked ``oversized`` and only counted. A write that fails (disk
full, permission) drops what was kept and sets ``failed``; the rest is only counted, and the core
answers ``451 4.3.0`` after the final dot.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

MEMORY_LIMIT = 1 << 20  # bytes kept in memory before spilling to disk
HEADER_LIMIT = 1 << 20  # bytes of header block parsed by headers()


def _write_all(file: BinaryIO, data) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


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
    def in_memory(self) -> bool:
        return self._file is None

    def getvalue(self) -> bytes | None:
        """The whole message when it is held in memory, else ``None`` (use :meth:`open`)."""
        return bytes(self._buffer) if self._file is None else None

    def open(self) -> BinaryIO:
        """A new binary reader positioned at the start of the message."""
        if self._file is None:
            return io.BytesIO(self._buffer)
        return open(self._path, "rb")  # noqa: SIM115 - the caller closes it

    def chunks(self, size: int = 1 << 16):
        """Iterate over the message in chunks of at most *size* bytes."""
        if self._file is None:
            view = memoryview(self._buffer)
            for i in range(0, len(view), size):
                yield bytes(view[i:i + size])
            return
        with self.open() as f:
            while chunk := f.read(size):
                yield chunk

    def head(self, limit: int = HEADER_LIMIT) -> bytes:
        """The header block (up to and including the empty line), at most *limit* bytes."""
        if self._file is None:
            data = bytes(self._buffer[:limit])
        else:
            with self.open() as f:
                data = f.read(limit)
        end = data.find(b"\r\n\r\n")
        if data.startswith(b"\r\n"):
            return b"\r\n"
        return data if end < 0 else data[:end + 4]

    def headers(self) -> list[tuple[str, str]]:
        """The top-level header fields as ``(name, value)``, unfolded, in order.

        Tolerant: lines that are not fields (no colon, a space inside the name) are skipped,
        whitespace between name and colon is allowed (RFC 5322 4.5.3, obsolete syntax), 8-bit
        bytes are kept (surrogateescape).
        """
        if self._headers is None:
            fields: list[list[str]] = []
            for line in self.head().decode("utf-8", "surrogateescape").split("\r\n"):
                if not line:
                    break
                if line[0] in " \t":
                    if fields:
                        fields[-1][1] += " " + line.strip()
                    continue
                name, colon, value = line.partition(":")
                name = name.rstrip(" \t")
                if colon and name and " " not in name and "\t" not in name:
                    fields.append([name, value.strip()])
            self._headers = [(n, v) for n, v in fields]
        return self._headers

    def header_count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers() if n.lower() == lname)
