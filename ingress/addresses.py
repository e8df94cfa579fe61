"""The one set of address rules: what the SMTP dialogue accepts, what the directory may hold, how
addresses are compared and which local parts may name a Maildir folder.

Syntax is RFC 5321 extended by RFC 6531/6532: a local part may hold UTF-8 (a non-ASCII
character wherever an ``atext`` or ``qtext`` character may stand), a domain may be written with
U-labels or A-labels (IDNA 2008, checked by the ``idna`` package). Comparison keys: the local part
in Unicode NFC, lower-cased (as ASCII local parts always were); the domain in its lower-case
A-label form, so ``bücher.example`` and ``xn--bcher-kva.example`` are one domain.

Plugin authors may import this module (``Directory`` offers the same functions as methods).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

import idna

__all__ = ["domain_key", "is_safe_local_part", "local_key", "normalise", "valid_address",
           "valid_domain"]

MAX_ADDRESS = 254  # octets of UTF-8: a path of 256 with its angle brackets (RFC 5321 4.5.3.1.3)
MAX_LOCAL = 64  # octets of UTF-8 (RFC 5321 4.5.3.1.1, RFC 6531 3.3)
MAX_DOMAIN = 253  # octets of the A-label form

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_SAFE_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        "!#$%&'*+=?^_`{|}~.-")
SAFE_LOCAL_PART = ("1 to 64 octets of the ASCII letters, digits and !#$%&'*+=?^_`{|}~.- or of "
                   "non-ASCII letters, marks and digits; no leading dot, no '..'")


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _address_literal(domain: str) -> bool:
    literal = domain[1:-1]
    try:
        if literal[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        return False
    return True


def _label(label: str) -> str | None:
    """One label as a lower-case A-label (or LDH label), or None when it is not valid."""
    if label.isascii():
        if not _LDH_LABEL.match(label):
            return None
        label = label.lower()
        if label.startswith("xn--"):
            try:  # an A-label must decode to a valid U-label and back to itself
                if idna.alabel(idna.ulabel(label)).decode("ascii") != label:
                    return None
            except (idna.IDNAError, UnicodeError):
                return None
        return label
    # Case and normalisation may differ from the U-label (clients write Bücher, or NFD), nothing
    # else: a width or compatibility mapping would make a different string the same domain.
    try:
        mapped = idna.uts46_remap(label, std3_rules=True, transitional=False)
        if mapped != unicodedata.normalize("NFC", label.lower()):
            return None
        return idna.alabel(mapped).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


@functools.lru_cache(maxsize=4096)
def _domain_key(domain: str) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        return domain.lower() if _address_literal(domain) else None
    if not domain or _octets(domain) > 4 * MAX_DOMAIN:  # U-labels: up to 4 octets a character
        return None
    labels = [_label(label) for label in domain.split(".")]
    if None in labels:
        return None
    key = ".".join(labels)  # type: ignore[arg-type]
    return key if len(key) <= MAX_DOMAIN else None


def valid_domain(domain: str) -> bool:
    """A host name (LDH labels, A-labels or IDNA 2008 U-labels) or an IPv4/IPv6 address
    literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    return isinstance(domain, str) and _domain_key(domain) is not None


def domain_key(domain: str) -> str:
    """The form domains are compared in: lower-case A-labels (``Bücher.Example`` ->
    ``xn--bcher-kva.example``); an address literal lower-cased. A domain that is not valid is only
    lower-cased (it equals no valid domain)."""
    domain = domain.strip()
    return _domain_key(domain) or domain.lower()


def local_key(local: str) -> str:
    """The form local parts are compared in, and the name of their Maildir folder: Unicode NFC,
    lower-cased."""
    if local.isascii():
        return local.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())


def split(address: str) -> tuple[str, str]:
    """``(local part as given, domain key)``; ValueError when there is no ``@``."""
    local, at, domain = address.rpartition("@")
    if not at:
        raise ValueError(f"not an address (no @): {address!r}")
    return local, domain_key(domain)


def normalise(address: str) -> str:
    """The comparison key of an address: ``"Jörg@Bücher.example"`` ->
    ``"jörg@xn--bcher-kva.example"``; ValueError when there is no ``@``."""
    local, domain = split(address)
    return f"{local_key(local)}@{domain}"


def valid_address(address: str, utf8: bool = True) -> bool:
    """RFC 5321 Mailbox syntax, with RFC 6531 UTF-8 unless *utf8* is false: a dot-atom or
    quoted local part of at most 64 octets, a host name or address literal, at most 254 octets
    in all; no control or other unprintable character anywhere."""
    if not isinstance(address, str) or not address.isprintable():
        return False
    if not utf8 and not address.isascii():
        return False
    local, at, domain = address.rpartition("@")
    if not at or not local or _octets(address) > MAX_ADDRESS or _octets(local) > MAX_LOCAL:
        return False
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        return False
    return _domain_key(domain) is not None


def is_safe_local_part(local: str) -> bool:
    """Whether *local* may name one Maildir folder: its folder name (:func:`local_key`) is 1 to
    64 octets of the ASCII letters, digits and ``!#$%&'*+=?^_`{|}~.-`` or of non-ASCII letters,
    marks and digits (Unicode categories L, M, N), with no leading dot and no ``..``. The one
    rule for catch-all local parts, for every local address of the directory and for the
    Maildir writer."""
    if not isinstance(local, str) or not local or not local.isprintable():
        return False
    name = local_key(local)
    if not 0 < _octets(name) <= MAX_LOCAL or name.startswith(".") or ".." in name:
        return False
    return all(c in _SAFE_ASCII or (not c.isascii() and unicodedata.category(c)[0] in "LMN")
               for c in name)
