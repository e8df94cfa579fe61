"""The builtin delivery backend: local Maildir and the relay queue. Registered as plugin
``delivery``; another backend replaces it by answering the ``deliver`` hook first.

Plugins may import :class:`Delivered`. Durability: a message is written to ``tmp/``, fsynced,
linked into each mailbox's ``new/``, and every touched directory is fsynced before ``deliver``
returns; the queue's ``.eml`` and ``.json`` are both fsynced, the ``.json`` renamed into place last
(its presence marks a complete entry). Any failure removes what was written and answers
``451 4.3.0``, so nothing half-written remains and the client retries.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from ingress import hookimpl
from ingress.delivery import maildir, queue
from ingress.reply import Reply

log = logging.getLogger("ingress.delivery")


@dataclass(frozen=True)
class Delivered:
    """Where a message went: mailbox files and queue entries."""

    queue_id: str
    mailboxes: tuple[str, ...] = ()  # final local addresses
    paths: tuple[str, ...] = ()  # files written
    relayed: tuple[str, ...] = ()  # recipients handed to the queue


def plan(session, transaction) -> tuple[list[tuple[str, str]], list]:
    """Split recipients into local mailboxes ``(domain, local part)`` and queue recipients."""
    directory = session.directory
    mailboxes: dict[tuple[str, str], None] = {}
    relay = []
    for rcpt in transaction.recipients:
        members = directory.expand(rcpt.address) if rcpt.local else [rcpt.address]
        for member in members:
            if directory.is_local_address(member):
                local, domain = directory.split(member)
                mailboxes[(domain, local.lower())] = None
            else:
                relay.append(type(rcpt)(member, dict(rcpt.params), False))
    return list(mailboxes), relay


def trace_headers(transaction, return_path: bool) -> bytes:
    lines = []
    if return_path:
        lines.append(f"Return-Path: <{transaction.mail_from}>")
    for name, value in transaction.added_headers:
        lines.append(f"{name}: {maildir.fold_safe(value)}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def store(session, transaction, message) -> Delivered:
    """Blocking: write the message everywhere it goes. Undoes everything on failure."""
    config = session.config
    mailboxes, relay = plan(session, transaction)
    written: list[str] = []
    try:
        if mailboxes:
            written += maildir.deliver(Path(config.data["delivery"]["maildir"]), mailboxes,
                                       trace_headers(transaction, True), message,
                                       config.hostname)
        if relay:
            written += queue.enqueue(Path(config.data["delivery"]["queue"]), transaction.id,
                                     trace_headers(transaction, False), message,
                                     queue.envelope(session, transaction, relay))
    except BaseException:
        maildir.remove_quietly(written)
        raise
    return Delivered(
        transaction.id,
        tuple(f"{local}@{domain}" for domain, local in mailboxes),
        tuple(written),
        tuple(r.address for r in relay),
    )


@hookimpl
async def deliver(session, transaction, message):
    try:
        return await asyncio.to_thread(store, session, transaction, message)
    except OSError as exc:
        log.error("queue id %s: storage failed: %s", transaction.id, exc)
        return Reply(451, "4.3.0", "Local storage error, try again later")
