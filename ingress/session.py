"""Per-connection and per-transaction state. Plugins may import these types for type hints.

A :class:`Session` lives as long as the connection, across STARTTLS: the SMTP state (HELO,
authentication, transaction) is reset there, the connection-wide ``counters`` and ``notes`` are
not. Plugins keep their own per-session state in ``session.notes[<plugin name>]``.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingress import process
from ingress.directory import Directory

if TYPE_CHECKING:
    from ingress.config import Config
    from ingress.state import Backend

_ids = itertools.count(1)


def new_id() -> str:
    """A queue id, unique per host: microsecond time, process id and a counter."""
    return f"{time.time_ns() // 1000:x}{process.pid:x}{next(_ids):x}".upper()


@dataclass
class Recipient:
    address: str  # as given by the client, without angle brackets
    params: dict[str, str | None] = field(default_factory=dict)
    # its domain is one of the directory's domains; None (a recipient a plugin added at the end
    # of DATA) until the core looks it up, before delivery
    local: bool | None = False
    param_error: str | None = None  # malformed parameter list, answered by the params check


@dataclass
class Transaction:
    """One MAIL FROM ... end of DATA."""

    mail_from: str  # "" is the null sender <>
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.time)
    # Upper bound on the raw message size the core keeps; None: no bound. Set by a size plugin.
    data_limit: int | None = None
    # Headers plugins add; written above the message in this order.
    added_headers: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # plugins' own: notes[<plugin name>]
    param_error: str | None = None  # malformed parameter list, answered by the params check
    #: why a plugin quarantined the message (see quarantine()), or None
    quarantined: str | None = None
    _first_headers: int = 0  # how many of added_headers were added with first=True

    @property
    def smtputf8(self) -> bool:
        """MAIL FROM carried ``SMTPUTF8`` (RFC 6531): UTF-8 addresses and headers allowed."""
        return "SMTPUTF8" in self.mail_params

    def add_header(self, name: str, value: str, *, first: bool = False) -> None:
        """Put ``name: value`` above the received message, below the headers added before it;
        with *first*, above every header added without it (``Received:`` included): the
        message's first header line (after ``Return-Path:`` in a Maildir). Among headers added
        with *first*, the first added comes first. CR/LF in *value* become folding."""
        if first:
            self.added_headers.insert(self._first_headers, (name, value))
            self._first_headers += 1
        else:
            self.added_headers.append((name, value))

    # Envelope edits, for on_data plugins (milter's addrcpt, delrcpt, chgfrom, quarantine).
    # Addresses are checked by the rules the directory uses; ValueError when they fail.

    def add_recipient(self, address: str, params: dict[str, str | None] | None = None) -> None:
        """Deliver the message to *address* too (no RCPT checks run for it: the plugin vouches
        for it). Adding an address the transaction already has does nothing."""
        _check_address(address)
        if self._recipient_index(address) is None:
            self.recipients.append(Recipient(address, dict(params or {}), None))

    def remove_recipient(self, address: str) -> bool:
        """Do not deliver to *address* (compared case-insensitively); whether it was there.
        A message left with no recipient is accepted and stored nowhere (logged)."""
        index = self._recipient_index(address)
        if index is None:
            return False
        del self.recipients[index]
        return True

    def change_sender(self, address: str) -> None:
        """Replace the MAIL FROM address (``""``: the null sender). Parameters stay."""
        if address != "":
            _check_address(address)
        self.mail_from = address

    def quarantine(self, reason: str) -> None:
        """Store the message, but apart: in each mailbox's ``Quarantine`` folder (Maildir++
        ``.Quarantine``), with ``"quarantine": reason`` in a queue envelope and an
        ``X-Ingress-Quarantine: reason`` header. It is never dropped."""
        reason = " ".join(str(reason).split()) or "quarantined"
        if self.quarantined is None:
            self.add_header("X-Ingress-Quarantine", reason)
        self.quarantined = reason

    def _recipient_index(self, address: str) -> int | None:
        key = _compared(address)
        for i, rcpt in enumerate(self.recipients):
            if _compared(rcpt.address) == key:
                return i
        return None


def _compared(address: str) -> str:
    try:
        return Directory.normalise(address)
    except ValueError:
        return address.lower()


def _check_address(address: str) -> None:
    if not Directory.is_valid_address(address):
        raise ValueError(f"not a valid address: {address!r}")


class Session:
    """One client connection."""

    def __init__(self, config: Config, peer: tuple, local: tuple, tls: bool,
                 connections: int):
        self.config = config
        self.id = new_id()
        self.peer_ip: str = peer[0] if peer else ""
        self.peer_port: int = peer[1] if peer else 0
        self.local_ip: str = local[0] if local else ""
        self.local_port: int = local[1] if local else 0
        self.connected_at = time.time()
        #: open connections on this server (all its worker processes) when this one was
        #: accepted, including this one
        self.connections = connections
        self.tls = tls
        self.counters: Counter[str] = Counter()
        self.notes: dict[str, Any] = {}
        self.timeouts: dict[str, float] = {}
        #: (octets per second, grace seconds) a DATA body must keep up; see set_min_data_rate
        self.min_data_rate: tuple[float, float] | None = None
        self._count_concurrent = None  # set by the core (ingress.smtp)
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.transaction: Transaction | None = None
        self.messages_accepted = 0
        #: the server's shared state (``server.state``); plugins get their own part of it as
        #: the ``state`` hook argument, never through this
        self.state_backend: Backend | None = None

    @property
    def hostname(self) -> str:
        return self.config.hostname

    @property
    def directory(self) -> Directory:
        return self.config.directory

    @functools.cached_property
    def ip_literal(self) -> str:
        """The client IP as an address literal: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
        try:
            ip = ipaddress.ip_address(self.peer_ip)
        except ValueError:
            return f"[{self.peer_ip}]"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped:
                return f"[{ip.ipv4_mapped}]"
            return f"[IPv6:{ip.compressed}]"
        return f"[{ip}]"

    @property
    def protocol(self) -> str:
        """SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848): the session's, whatever its
        transactions (see :meth:`transaction_protocol`)."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def transaction_protocol(self, transaction: Transaction) -> str:
        """The ``with`` of a Received header for *transaction*: :attr:`protocol`, or for an
        SMTPUTF8 transaction UTF8SMTP, UTF8SMTPS, UTF8SMTPA or UTF8SMTPSA (RFC 6531 4.3)."""
        if self.esmtp and transaction.smtputf8:
            return "UTF8SMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")
        return self.protocol

    def set_timeout(self, kind: str, seconds: float | None) -> None:
        """Set a timer the core runs; ``None`` removes it. Plugins call this from ``on_connect``.

        ``"idle"``: nothing received since the last reply and no 354/334 outstanding.
        ``"command"``: the client owes bytes: a partial command line, the DATA body after 354,
        the answer after 334, or it has not read replies that pile up. Both count from the last
        byte received or reply sent, whichever is later, so data that keeps flowing is never
        cut; neither runs while the server itself is busy. When one fires the client gets
        ``421 4.4.2 <hostname> Session timeout`` / ``Command timeout`` and is disconnected (reset
        at once if it cannot take the reply: unread replies, or a stalled TLS handshake)."""
        if kind not in ("idle", "command"):
            raise ValueError(f"unknown timeout kind {kind!r}")
        if seconds is None:
            self.timeouts.pop(kind, None)
        else:
            self.timeouts[kind] = float(seconds)

    def set_min_data_rate(self, octets_per_second: float | None, grace: float = 0.0) -> None:
        """Cut a slow DATA body: *t* seconds after its ``354`` it must have delivered at least
        ``octets_per_second * (t - grace)`` octets, else the client gets ``421 4.4.2 <hostname>
        Command timeout`` and is disconnected, like on the command timer (the core applies the
        same check to each BDAT chunk, from its BDAT command). ``None`` or 0
        turns it off. Plugins call this from ``on_connect``."""
        if octets_per_second:
            self.min_data_rate = (float(octets_per_second), float(grace))
        else:
            self.min_data_rate = None

    def count_concurrent(self, key: str) -> int:
        """Count this connection under *key* for as long as it is open; return how many open
        connections of this server (all its worker processes) are counted under *key*, this one
        included. The core takes the count back exactly once, when the connection ends or the
        server cuts it, however that happens. For per-client limits (the ``max_connections``
        plugin counts the client's address); each call counts once more."""
        return self._count_concurrent(key)

    def reset_smtp_state(self) -> None:
        """Forget HELO, authentication and the transaction (RFC 3207 after STARTTLS)."""
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.transaction = None
