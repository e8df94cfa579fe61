"""SMTP replies as values. Plugin authors may import this module (``ingress.Reply``).

A decision hook returns ``None`` (no opinion) or a :class:`Reply`. Plugins never write wire
text themselves: :meth:`Reply.wire` renders the reply, and no CR or LF from a plugin or a
client can ever end up splitting a reply line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Make *text* safe on one reply line: control characters (CR, LF, NUL...) become spaces."""
    return _UNSAFE.sub(" ", text)


@dataclass(frozen=True)
class Reply:
    """One SMTP reply.

    :param code: the three-digit reply code (220, 250, 421, 550...).
    :param enhanced: the RFC 3463 enhanced status code ("5.1.1"), or ``""`` where none is sent
        (greeting, HELO/EHLO replies).
    :param text: the reply text; a tuple of lines makes a multi-line reply.
    :param close: close the connection after sending this reply.
    """

    code: int
    enhanced: str
    text: str | tuple[str, ...]
    close: bool = False

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def wire(self) -> bytes:
        """The reply as bytes on the wire, CRLF-terminated, one line per text line. Rendered
        once per reply: the core's constant replies are sent again and again."""
        rendered = self.__dict__.get("_wire")
        if rendered is None:
            rendered = self.__dict__["_wire"] = self._render()
        return rendered

    def _render(self) -> bytes:
        text, enhanced = self.text, self.enhanced
        if (isinstance(text, str) and enhanced and text and text.isprintable()
                and not text[-1].isspace()):
            # The usual reply (one line of plain text): nothing to clean or strip.
            return f"{self.code} {enhanced} {text}\r\n".encode("utf-8", "replace")
        lines = self.lines or ("",)
        prefix = f"{enhanced} " if enhanced else ""
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{clean_text(line)}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return self.wire().decode().rstrip("\r\n").replace("\r\n", " | ")

    # Named constructors for the replies plugins give most often.
    @classmethod
    def ok(cls, text: str = "OK", enhanced: str = "2.0.0") -> Reply:
        return cls(250, enhanced, text)

    @classmethod
    def reject(cls, code: int, enhanced: str, text: str) -> Reply:
        """A refusal that keeps the session open (4xx temporary, 5xx permanent)."""
        return cls(code, enhanced, text)

    @classmethod
    def close_with(cls, code: int, enhanced: str, text: str) -> Reply:
        """A reply after which the server closes the connection (usually 421)."""
        return cls(code, enhanced, text, close=True)

    @classmethod
    def tempfail(cls, text: str = "Temporary local problem, try again later") -> Reply:
        return cls(451, "4.3.0", text)
