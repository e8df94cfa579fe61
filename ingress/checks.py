"""Core checks expressed as plugins so they take their place in the order of checks:
``params`` (unknown or malformed MAIL/RCPT parameters) and ``mailbox`` (does a local
recipient exist). Private to the core."""

from __future__ import annotations

from ingress import hookimpl
from ingress.reply import Reply

CORE_PARAMETERS = {"MAIL": {"BODY", "SIZE"}, "RCPT": set()}
BODY_VALUES = {"7BIT", "8BITMIME"}


async def _known(session, verb: str) -> set[str]:
    cache = session.notes.setdefault("params", {})
    if verb not in cache:
        names = set(CORE_PARAMETERS[verb])
        for _, found in await session.config.hooks.collect("esmtp_parameters", session=session,
                                                           verb=verb):
            names.update(n.upper() for n in found)
        cache[verb] = names
    return cache[verb]


async def _check(session, verb: str, params: dict, error: str | None) -> Reply | None:
    if error:
        return Reply(501, "5.5.4", error)
    known = await _known(session, verb)
    for name in params:
        if name not in known:
            return Reply(555, "5.5.4", f"{verb} parameter {name} not supported")
    return None


@hookimpl
async def on_mail_from(session, transaction):
    reply = await _check(session, "MAIL", transaction.mail_params, transaction.param_error)
    if reply is not None:
        return reply
    params = transaction.mail_params
    if "BODY" in params and (params["BODY"] or "").upper() not in BODY_VALUES:
        return Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
    if "SIZE" in params and not (params["SIZE"] or "").isdigit():
        return Reply(501, "5.5.4", "SIZE must be a number of octets")
    return None


@hookimpl
async def on_rcpt(session, recipient):
    return await _check(session, "RCPT", recipient.params, recipient.param_error)


class Mailbox:
    """A recipient in a local domain must be a user, an alias, a list, or a catch-all domain."""

    @hookimpl
    def on_rcpt(self, session, recipient):
        if not recipient.local:
            return None
        directory = session.directory
        if directory.mailbox_exists(recipient.address):
            return None
        local, domain = directory.split(recipient.address)
        if directory.domain_settings(domain).catch_all:
            return Reply(553, "5.1.3", "Mailbox name not allowed")
        return Reply(550, "5.1.1", "Mailbox unavailable")
