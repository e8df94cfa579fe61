"""The pure syntax of SMTP commands: no I/O, no state, every function total on any input and
linear in its length (tests/core/test_parser_property.py checks both). Private to the core."""

from __future__ import annotations

import base64
import binascii
import re

from ingress import addresses
from ingress.auth import AuthCancelled, AuthSyntaxError

COMMAND_LIMIT = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
AUTH_LINE_LIMIT = 12288  # RFC 4954 4
MAX_RECIPIENTS = 1000

BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
# xtext: "!" to "~" except "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
_XTEXT_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")


def split_command(line: bytes) -> tuple[str, str | None]:
    """``(VERB, argument)`` of a command line without its line ending: the verb upper-cased
    (``""`` when it is not ASCII), the argument decoded as UTF-8 and stripped; None when it is
    not UTF-8 (RFC 6531: commands carry UTF-8 or nothing 8-bit)."""
    verb_bytes, _, arg_bytes = line.partition(b" ")
    try:
        verb = verb_bytes.decode("ascii").upper()
    except UnicodeDecodeError:
        verb = ""
    try:
        return verb, arg_bytes.decode("utf-8").strip()
    except UnicodeDecodeError:
        return verb, None


def too_long(line: bytes) -> bool:
    """Whether a command line (with its line ending) is over the limit: 512 octets, an AUTH
    line (which may carry an initial response) 12288."""
    return len(line) > COMMAND_LIMIT and not (
        len(line) <= AUTH_LINE_LIMIT and line[:5].upper() == b"AUTH ")


def valid_address(address: str) -> bool:
    """RFC 5321 Mailbox syntax with RFC 6531 UTF-8: the rules of :mod:`ingress.addresses`,
    which the directory uses too. Whether UTF-8 is allowed in this transaction is asked apart
    (``553 5.6.7`` without SMTPUTF8)."""
    return addresses.valid_address(address)


def query_argument(arg: str) -> str:
    """The address or name a VRFY or EXPN asks about: angle brackets removed, and an
    ``SMTPUTF8`` parameter after it dropped (RFC 6531 3.7.4.2: accepted and ignored)."""
    head, _, last = arg.rpartition(" ")
    if head and last.upper() == "SMTPUTF8":
        arg = head.rstrip()
    return arg.strip("<>")


def parse_path(arg: str, keyword: str) -> tuple[str, str] | None:
    """Split ``FROM:<addr> params`` into (address, params text); None if the keyword is wrong."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        address, params = rest[1:end], rest[end + 1:]
        if params and not params.startswith(" "):
            return None
    else:
        address, _, params = rest.partition(" ")
    if address.startswith("@"):  # a source route "@a,@b:user@d": ignore the route
        address = address.partition(":")[2]
    return address, params.strip()


def parse_params(text: str) -> tuple[dict[str, str | None], str | None]:
    """ESMTP parameters as {UPPER KEY: value or None}, and a syntax error message or None."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not _PARAM_VALUE.match(value)):
            return params, f"Malformed parameter {item[:40]!r}"
        key = key.upper()
        if key in params:
            return params, f"Duplicate parameter {key}"
        params[key] = value if eq else None
    return params, None


def xtext_decode(value: str) -> str | None:
    """The text an xtext (RFC 3461 4: ENVID, ORCPT, AUTH=) stands for, or ``None`` if *value*
    is not valid xtext."""
    if not _XTEXT.match(value):
        return None
    return _XTEXT_HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def merge_size_keywords(keywords: list[str]) -> list[str]:
    """*keywords* with one ``SIZE`` where plugins gave several (each one enforces its own limit,
    say the message size policy and a storage backend): the smallest fixed limit (RFC 1870:
    ``SIZE 0`` or a bare ``SIZE`` means none), in the first one's place."""
    words = [keyword.split(None, 1) for keyword in keywords]
    sizes = [i for i, split in enumerate(words) if split and split[0].upper() == "SIZE"]
    if len(sizes) < 2:
        return keywords
    limits = [int(arg) for arg in (words[i][1].strip() if len(words[i]) > 1 else ""
                                   for i in sizes)
              if arg.isascii() and arg.isdigit() and int(arg) > 0]
    merged = f"SIZE {min(limits)}" if limits else "SIZE"
    out = [keyword for i, keyword in enumerate(keywords) if i not in sizes[1:]]
    out[sizes[0]] = merged
    return out


def bdat_size(arg: str) -> tuple[int, bool] | None:
    """``BDAT`` arguments as (octets, last), or None when they are not ``<digits> [LAST]``."""
    words = [word for word in arg.split(" ") if word]
    if not 1 <= len(words) <= 2 or (len(words) == 2 and words[1].upper() != "LAST"):
        return None
    if not (words[0].isascii() and words[0].isdigit()) or len(words[0]) > 20:
        return None
    return int(words[0]), len(words) == 2


def sasl_response(text: str) -> bytes:
    """A base64 SASL response; ``*`` cancels (AuthCancelled), bad base64 is AuthSyntaxError."""
    if text == "*":
        raise AuthCancelled()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthSyntaxError() from None
