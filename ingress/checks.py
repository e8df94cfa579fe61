"""Core checks expressed as plugins so they take their place in the order of checks:
``params`` (unknown or malformed MAIL/RCPT parameters) and ``mailbox`` (does a local
recipient exist). Private to the core."""

from __future__ import annotations

from ingress import hookimpl
from ingress.delivery import may_create_mailbox
from ingress.reply import Reply

CORE_PARAMETERS = {"MAIL": {"BODY", "SIZE", "SMTPUTF8"}, "RCPT": set()}
BODY_VALUES = {"7BIT", "8BITMIME", "BINARYMIME"}


def _when_known(session, verb: str, check, *args):
    """``check(known_names, *args)`` once the parameter names of *verb* are known: at
    once when this session has already asked the plugins (the common case, no coroutine), else
    an awaitable that asks them first (the core awaits what a hook returns)."""
    known = session.notes.get("params", {}).get(verb)
    if known is not None:
        return check(known, *args)
    return _learn(session, verb, check, *args)


async def _learn(session, verb: str, check, *args):
    names = set(CORE_PARAMETERS[verb])
    for _, found in await session.config.hooks.call("esmtp_parameters", session=session,
                                                       verb=verb):
        names.update(n.upper() for n in found)
    session.notes.setdefault("params", {})[verb] = names
    return check(names, *args)


def _unknown(verb: str, params: dict, known: set[str]) -> Reply | None:
    for name in params:
        if name not in known:
            return Reply(555, "5.5.4", f"{verb} parameter {name} not supported")
    return None


def _check_mail(known: set[str], transaction) -> Reply | None:
    params = transaction.mail_params
    reply = _unknown("MAIL", params, known)
    if reply is not None:
        return reply
    if "BODY" in params and (params["BODY"] or "").upper() not in BODY_VALUES:
        return Reply(501, "5.5.4", "BODY must be 7BIT, 8BITMIME or BINARYMIME")
    if "SIZE" in params and not (params["SIZE"] or "").isdigit():
        return Reply(501, "5.5.4", "SIZE must be a number of octets")
    if params.get("SMTPUTF8", None) is not None:
        return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
    return None


def _check_rcpt(known: set[str], recipient) -> Reply | None:
    return _unknown("RCPT", recipient.params, known)


@hookimpl
def on_mail_from(session, transaction):
    if transaction.param_error:
        return Reply(501, "5.5.4", transaction.param_error)
    return _when_known(session, "MAIL", _check_mail, transaction)


@hookimpl
def on_rcpt(session, recipient):
    if recipient.param_error:
        return Reply(501, "5.5.4", recipient.param_error)
    return _when_known(session, "RCPT", _check_rcpt, recipient)


class Mailbox:
    """A recipient in a local domain must be a user, an alias, a list, or a catch-all domain
    (with room for one more mailbox if its folder is new)."""

    @hookimpl
    def on_rcpt(self, session, transaction, recipient):
        if not recipient.local:
            return None
        directory = session.directory
        if directory.mailbox_exists(recipient.address):
            if may_create_mailbox(session, transaction, recipient.address):
                return None
            return Reply(452, "4.3.1", "Too many mailboxes")
        local, domain = directory.split(recipient.address)
        if directory.domain_settings(domain).catch_all:
            return Reply(553, "5.1.3", "Mailbox name not allowed")
        return Reply(550, "5.1.1", "Mailbox unavailable")
