"""dsn: Delivery Status Notifications (RFC 3461) — the RET, ENVID, NOTIFY and ORCPT parameters,
and success DSNs (RFC 3464) for local deliveries.

The parameters stay in ``transaction.mail_params`` and each ``recipient.params`` as the client
gave them, except that the keywords of RET and NOTIFY are upper-cased; ENVID and ORCPT stay
xtext-encoded (what a relay passes on; :func:`ingress.syntax.xtext_decode` gives the text).
The core writes them into the queue envelope.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from datetime import datetime
from email.utils import format_datetime, formatdate

import ingress_schemas
from ingress import Reply, hookimpl
from ingress.delivery import (
    Generated,
    may_create_mailbox,
    may_relay,
    store_generated,
    trace_headers,
)
from ingress.session import new_id
from ingress.syntax import xtext_decode

log = logging.getLogger("ingress.dsn")

MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
NOTIFY_VALUES = {"SUCCESS", "FAILURE", "DELAY"}
ENVID_MAX = 100  # RFC 3461 4.4
ORCPT_MAX = 500  # RFC 3461 4.2

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")


@hookimpl
def config_schema():
    return ingress_schemas.load("dsn")


def _malformed(name: str, why: str) -> Reply:
    return Reply(501, "5.5.4", f"Malformed {name} parameter: {why}")


# --- parameters --------------------------------------------------------------------------------


@hookimpl
def ehlo_keywords(settings):
    return ["DSN"] if settings["enabled"] else []


@hookimpl
def esmtp_parameters(verb, settings):
    if not settings["enabled"]:
        return []
    return MAIL_PARAMETERS if verb == "MAIL" else RCPT_PARAMETERS


@hookimpl
def on_mail_from(transaction, settings):
    if not settings["enabled"]:
        return None
    params = transaction.mail_params
    if "RET" in params:
        ret = (params["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            return _malformed("RET", "FULL or HDRS")
        params["RET"] = ret
    if "ENVID" in params:
        raw = params["ENVID"] or ""
        text = xtext_decode(raw)
        if not raw or text is None or not _PRINTABLE.match(text):
            return _malformed("ENVID", "not xtext of printable characters")
        if len(raw) > ENVID_MAX:
            return _malformed("ENVID", f"longer than {ENVID_MAX} characters")
    return None


def parse_notify(value: str | None) -> set[str] | None:
    """``NOTIFY`` as a set of upper-case keywords; ``None`` if malformed."""
    words = [w.upper() for w in (value or "").split(",")]
    if words == ["NEVER"]:
        return {"NEVER"}
    if not all(w in NOTIFY_VALUES for w in words):
        return None  # unknown or empty keyword, or NEVER with others
    return set(words)


def parse_orcpt(value: str | None) -> tuple[str, str] | None:
    """``ORCPT`` as ``(address type, decoded address)``; ``None`` if malformed."""
    kind, semicolon, xtext = (value or "").partition(";")
    address = xtext_decode(xtext)
    if (not semicolon or not _ATOM.match(kind) or not address or len(xtext) > ORCPT_MAX
            or not _PRINTABLE.match(address)):
        return None
    return kind, address


@hookimpl
def on_rcpt(recipient, settings):
    if not settings["enabled"]:
        return None
    params = recipient.params
    if "NOTIFY" in params:
        words = parse_notify(params["NOTIFY"])
        if words is None:
            return _malformed("NOTIFY", "NEVER, or a list of SUCCESS, FAILURE, DELAY")
        params["NOTIFY"] = params["NOTIFY"].upper()
    if "ORCPT" in params and parse_orcpt(params["ORCPT"]) is None:
        return _malformed("ORCPT", "addr-type;xtext")
    return None


# --- success notifications -------------------------------------------------------------------


def wants_success(session, recipient) -> bool:
    """A local recipient that asked for NOTIFY=SUCCESS and was delivered to a local mailbox (an
    alias or list whose members are all elsewhere was relayed, not delivered: the queue keeps
    its NOTIFY for whoever delivers it)."""
    if not recipient.local or "SUCCESS" not in (parse_notify(recipient.params.get("NOTIFY"))
                                                or ()):
        return False
    directory = session.directory
    return any(directory.is_local_address(m) for m in directory.expand(recipient.address))


@hookimpl
def after_delivery(session, transaction, message, settings):
    if not settings["enabled"] or not transaction.mail_from:  # never to the null sender
        return
    recipients = [r for r in transaction.recipients if wants_success(session, r)]
    if not recipients:
        return
    sender = transaction.mail_from
    directory = session.directory
    if directory.is_local_address(sender):
        if not directory.mailbox_exists(sender):
            log.info("queue id %s: no success DSN: sender <%s> has no mailbox", transaction.id,
                     sender)
            return
        if not may_create_mailbox(session, transaction, sender):
            log.info("queue id %s: no success DSN: sender <%s> would be a mailbox over the "
                     "catch-all limit", transaction.id, sender)
            return
        report = success_report(session, transaction, message, recipients)
        return store_report(session, transaction, sender, report)  # awaited by the core
    return report_if_relay_allowed(session, transaction, message, recipients, sender)


async def report_if_relay_allowed(session, transaction, message, recipients, sender: str):
    """An outside sender gets a report only if the session may relay to it (whoever may not
    could otherwise forge MAIL FROM and have us mail the message to a victim: backscatter)."""
    if not await may_relay(session, transaction, sender):
        log.info("queue id %s: no success DSN: this session may not relay to sender <%s>",
                 transaction.id, sender)
        return
    await store_report(session, transaction, sender,
                       success_report(session, transaction, message, recipients))


async def store_report(session, transaction, sender: str, report) -> None:
    stored = await asyncio.to_thread(store_generated, session, "", sender, report)
    log.info("queue id %s: success DSN %s to <%s>", transaction.id, stored.queue_id, sender)


def _lines(*lines: str) -> bytes:
    # UTF-8 only where an SMTPUTF8 address stands (RFC 6532 headers); anything else is ASCII.
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")


def _address_field(address: str) -> str:
    """A Final-Recipient value (RFC 3464; RFC 6533 ``utf-8`` type with utf-8-addr-xtext for a
    non-ASCII address, so the field stays ASCII)."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        c if " " < c < "\x7f" and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address)


def success_report(session, transaction, message, recipients) -> Generated:
    """A multipart/report (RFC 6522) with a message/delivery-status (RFC 3464) part and the
    original message (RET=FULL) or its header (RET=HDRS, the default for success)."""
    hostname = session.hostname
    boundary = f"{transaction.id}.{secrets.token_hex(12)}/{hostname}"
    envid = transaction.mail_params.get("ENVID")
    full = transaction.mail_params.get("RET") == "FULL"
    arrival = format_datetime(datetime.fromtimestamp(transaction.started).astimezone())
    head = _lines(
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{transaction.mail_from}>",
        "Subject: Successful Mail Delivery Report",
        f"Date: {formatdate(localtime=True)}",
        f"Message-ID: <{new_id()}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"Delivery report from the mail server {hostname}.",
        "",
        "You asked to be told when your message reached these recipients; it was",
        "stored in their mailboxes on this server:",
        "",
        *(f"  <{r.address}>" for r in recipients),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        *([f"Original-Envelope-Id: {xtext_decode(envid)}"] if envid else []),
        f"Arrival-Date: {arrival}",
    )
    for r in recipients:
        orcpt = parse_orcpt(r.params.get("ORCPT")) if r.params.get("ORCPT") else None
        head += _lines(
            "",
            f"Final-Recipient: {_address_field(r.address)}",
            *([f"Original-Recipient: {orcpt[0]}; {orcpt[1]}"] if orcpt else []),
            "Action: delivered",
            "Status: 2.0.0",
        )
    head += _lines(
        "",
        f"--{boundary}",
        "Content-Description: " + ("Delivered message" if full else "Message headers"),
        "Content-Type: " + ("message/rfc822" if full else "text/rfc822-headers"),
        "",
    )
    trace = trace_headers(transaction, False)
    tail = _lines("", f"--{boundary}--")
    if full:
        return Generated(head, trace, message, tail)
    return Generated(head, trace, message.head(), tail)
