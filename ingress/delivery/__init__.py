"""The builtin delivery backend: local Maildir and the relay queue. Registered as plugin
``delivery``; another backend replaces it by answering the ``deliver`` hook first.

Plugins may import :class:`Delivered`, :func:`may_relay`, :func:`may_create_mailbox`,
:func:`store_generated` and :class:`Generated`.

Durability: a message is written to ``tmp/``, its data made durable, linked into each mailbox's
``new/``, and its new directory entries made durable before ``deliver`` answers. Messages that
are ready together share one thread hop and one flush of their data per file system
(``syncfs``; with ``delivery.sync = "file"``, or where the kernel cannot report write-back
errors that way, an fsync per file); their entries are carried by the next batch's flush of
that file system (else one fsync per directory): :mod:`.batch`. The queue's ``.eml`` and ``.json``
likewise, the ``.json`` renamed into place last (its presence marks a complete entry). Any
failure removes what was written and answers ``451 4.3.0``, so nothing half-written remains and
the client retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ingress import hookimpl
from ingress.delivery import batch, maildir, queue
from ingress.session import Recipient, Transaction

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
                mailboxes[directory.mailbox(member)] = None
            else:
                relay.append(type(rcpt)(member, dict(rcpt.params), False))
    return list(mailboxes), relay


def expand(session, transaction) -> list[Recipient]:
    """Every final recipient: aliases and lists replaced by their members (each with the
    parameters of the RCPT that named it), local mailboxes once each; ``local`` tells whether it
    is a local mailbox."""
    directory = session.directory
    seen: set[tuple[str, str]] = set()
    final = []
    for rcpt in transaction.recipients:
        members = directory.expand(rcpt.address) if rcpt.local else [rcpt.address]
        for member in members:
            local = directory.is_local_address(member)
            if local:
                box = directory.mailbox(member)
                if box in seen:
                    continue
                seen.add(box)
            final.append(Recipient(member, dict(rcpt.params), local))
    return final


def envelope_text(session, transaction, recipients) -> str:
    """The envelope of a message for *recipients*: exactly the text the relay queue writes to
    ``<id>.json`` (schema: ``schemas/envelope.json``). For delivery backends."""
    return queue.dumps(queue.envelope(session, transaction, recipients))


def store_mailboxes(session, transaction, message, mailboxes) -> list[str]:
    """Blocking: write the message into the local *mailboxes* (``(domain, local part)`` as
    :func:`plan` gives them), durably; return the files written (nothing is left on failure)."""
    if not mailboxes:
        return []
    config = session.config
    return maildir.deliver(Path(config.data["delivery"]["maildir"]), mailboxes,
                           trace_headers(transaction, True), message, config.hostname,
                           transaction.quarantined is not None,
                           config.data["delivery"]["sync"] == "batch")


def remove(paths) -> None:
    """Blocking: remove files a delivery wrote (undo), ignoring those already gone."""
    maildir.remove_quietly(paths)


async def may_relay(session, transaction, address: str) -> bool:
    """Whether *session* may have mail sent to *address*: the first answer of the ``may_relay``
    hook; no answer, or a failing plugin, is no. For plugins that write mail of their own to an
    address the client chose."""
    allowed, _ = await session.config.hooks.call("may_relay", session=session,
                                                 transaction=transaction, address=address)
    return allowed is True


_mailbox_cap = maildir.MailboxCap()


def may_create_mailbox(session, transaction, address: str) -> bool:
    """Whether mail for the local *address* may be stored: always for a user, alias or list or
    a mailbox whose folder exists; for a name that exists only through a catch-all domain, only
    while the domain's folder has fewer than ``catch_all_max_mailboxes`` mailboxes (counting
    names that live transactions of this process already hold). A name it admits is held until
    *transaction* is gone. Called on the event loop."""
    directory = session.directory
    domain, name = directory.mailbox(address)
    settings = directory.domain_settings(domain)
    if not settings.catch_all or directory.is_configured(address):
        return True
    folder = os.path.join(session.config.data["delivery"]["maildir"], domain)
    return _mailbox_cap.admit(folder, name, settings.catch_all_max_mailboxes, transaction)


def trace_headers(transaction, return_path: bool) -> bytes:
    lines = []
    if return_path:
        lines.append(f"Return-Path: <{transaction.mail_from}>")
    for name, value in transaction.added_headers:
        lines.append(f"{name}: {maildir.fold_safe(value)}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def store(session, transaction, message, *, generated: bool = False) -> Delivered:
    """Blocking: write the message everywhere it goes. Undoes everything on failure.

    *generated*: the message was written by this server (a DSN), not received from the client.
    """
    return maildir.commit_one(partial(stage, session, transaction, message,
                                      generated=generated))


def stage(session, transaction, message, commit: maildir.Commit, generated: bool = False
          ) -> tuple[Delivered, list[str], list[str]]:
    """Blocking: write the message's files through *commit* (``maildir.commit_group`` makes
    them durable and publishes them): ``(what was delivered, final paths, folders whose entries
    must be made durable)``."""
    config = session.config
    mailboxes, relay = plan(session, transaction)
    batch = config.data["delivery"]["sync"] == "batch"
    written: list[str] = []
    folders: list[str] = []
    if mailboxes:
        finals, boxes = maildir.stage(commit, config.data["delivery"]["maildir"], mailboxes,
                                      trace_headers(transaction, True), message,
                                      config.hostname, transaction.quarantined is not None, batch)
        written += finals
        folders += boxes
    if relay:
        root = Path(config.data["delivery"]["queue"])
        written += queue.stage(commit, root, transaction.id, trace_headers(transaction, False),
                               message, queue.envelope(session, transaction, relay, generated),
                               batch)
        folders.append(str(root))
    delivered = Delivered(
        transaction.id,
        tuple(f"{local}@{domain}" for domain, local in mailboxes),
        tuple(written),
        tuple(r.address for r in relay),
    )
    return delivered, written, folders


class Generated:
    """A message this server writes itself (a DSN), made of parts: byte strings and objects
    with ``chunks()`` (such as the received :class:`ingress.spool.Message`). The parts are
    streamed to disk one after the other, never joined in memory."""

    def __init__(self, *parts) -> None:
        self.parts = parts

    def getvalue(self) -> None:
        return None

    def chunks(self, size: int = 1 << 20):
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
            else:
                yield from part.chunks(size)


def store_generated(session, mail_from: str, recipient: str, message: Generated) -> Delivered:
    """Blocking: store a message generated by this server for *recipient*, durably: a local
    address to its Maildir (an alias to its members), any other to the relay queue. The queue
    envelope says ``"generated": true`` and has no client fields."""
    local = session.directory.is_local_address(recipient)
    params: dict[str, str | None] = {} if recipient.isascii() else {"SMTPUTF8": None}
    transaction = Transaction(mail_from, params, recipients=[Recipient(recipient, {}, local)])
    return store(session, transaction, message, generated=True)


@hookimpl
def deliver(session, transaction, message) -> asyncio.Future:
    """Hand the message to this event loop's delivery batch (see :mod:`.batch`): a future of
    its :class:`Delivered` once durable, or of a ``451`` reply when storing it failed."""
    return batch.for_loop().submit(partial(stage, session, transaction, message),
                                   transaction.id, getattr(message, "size", 0))
