"""relay: who may send mail to recipients outside the local domains ("Allow Relay").

A recipient in a local domain is never a relay. Any other recipient is accepted when the client IP
is in ``whitelist``, or the session is authenticated and ``authenticated`` is true, or ``allow``
permits the sender (``anyone``; ``local_domains``: MAIL FROM in a local domain; ``local_users``:
MAIL FROM is an existing local user). Otherwise ``550 5.7.1 Relaying denied``. The same rules
answer the ``may_relay`` hook (may this session have mail sent to an address of its choosing).

It also answers ``per_domain_statistics``: not with an open relay (``allow = "anyone"``), so
the metrics leave out their per-domain series. Other plugins may import :func:`relay_reason`.
"""

from __future__ import annotations

import logging

import ingress_schemas
from ingress import Reply, hookimpl, ipnets
from ingress.errors import ConfigWarning

log = logging.getLogger("ingress.relay")

DENIED = Reply(550, "5.7.1", "Relaying denied")


@hookimpl
def config_schema():
    return ingress_schemas.load("relay")


def whitelisted(peer_ip: str, whitelist: list[str]) -> bool:
    return ipnets.matches(peer_ip, whitelist)


def relay_reason(session, transaction, settings) -> str | None:
    """Why this session may relay (``"whitelist"``, ``"authenticated"``, or the ``allow``
    value that permits it), or ``None`` when it may not."""
    if whitelisted(session.peer_ip, settings["whitelist"]):
        return "whitelist"
    if session.auth_user is not None and settings["authenticated"]:
        return "authenticated"
    allow = settings["allow"]
    sender = transaction.mail_from
    directory = session.directory
    if allow == "anyone":
        return allow
    if allow == "local_domains" and sender and directory.is_local_address(sender):
        return allow
    if allow == "local_users" and sender and directory.user(sender) is not None:
        return allow
    return None


@hookimpl
def check_settings(settings):
    if settings["allow"] == "anyone":
        return [ConfigWarning("/allow", "'anyone' makes this an open relay")]
    return None


@hookimpl
def per_domain_statistics(settings) -> bool | None:
    """No per-domain statistics for an open relay (``allow = "anyone"``); no opinion otherwise."""
    return False if settings["allow"] == "anyone" else None


@hookimpl
def may_relay(session, transaction, address, settings) -> bool:
    """The same rules as for a recipient: a local address always, any other when
    :func:`relay_reason` gives a reason."""
    if session.directory.is_local_address(address):
        return True
    return relay_reason(session, transaction, settings) is not None


@hookimpl
def on_rcpt(session, transaction, recipient, settings):
    if recipient.local:
        return None
    reason = relay_reason(session, transaction, settings)
    if reason is None:
        log.info("session %s %s: relaying denied: from=<%s> to=<%s>", session.id,
                 session.peer_ip, transaction.mail_from, recipient.address)
        return DENIED
    return None
