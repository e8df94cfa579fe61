"""auth_match: an authenticated session may only send as its own user ("Require Auth Match").

At MAIL: ``email`` wants MAIL FROM to be the authenticated address, ``domain`` wants it in the
user's domain (the null sender is refused under both): ``553 5.7.1``. With ``mime_headers``, at the
end of DATA the From: and Sender: headers are checked too (``550 5.7.1``):

* ``email``: From: is the user; or Sender: is the user and every From: address is in the user's
  ``send_as`` (the user may send on behalf of those addresses);
* ``domain``: every From: address, and Sender: if present, is in the user's domain.

A message must have exactly one From: header and at most one Sender: header to be checked at all
(two From: headers, or one hidden as ``From :``, are a classic way to show a reader another
sender than the one checked); otherwise it is refused with the same ``550 5.7.1``.
Unauthenticated sessions are never affected.
"""

from __future__ import annotations

from email.utils import getaddresses

import ingress_schemas
from ingress import Reply, hookimpl
from ingress.directory import Directory

NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")


@hookimpl
def config_schema():
    return ingress_schemas.load("auth_match")


def _key(address: str) -> str | None:
    try:
        return Directory.normalise(address)
    except ValueError:
        return None


def _domain(address: str) -> str | None:
    key = _key(address)
    return key.rpartition("@")[2] if key else None


def sender_allowed(user: str, address: str, require: str) -> bool:
    """Whether MAIL FROM *address* ("" is the null sender) is allowed for *user*."""
    if require == "email":
        return bool(address) and _key(address) == _key(user)
    if require == "domain":
        return bool(address) and _domain(address) == _domain(user)
    return True


@hookimpl
def on_mail_from(session, transaction, settings):
    user = session.auth_user
    if user is None or sender_allowed(user, transaction.mail_from, settings["require"]):
        return None
    return NOT_OWNED


def _fields(message) -> dict[str, list[str]]:
    """Values of the top-level From: and Sender: fields, also when written ``From :``."""
    found: dict[str, list[str]] = {"from": [], "sender": []}
    for name, value in message.headers():
        values = found.get(name.lower())
        if values is not None:
            values.append(value)
    return found


def _addresses(value: str) -> list[str] | None:
    """The addresses of one header value; None when any of them is not a valid address."""
    addresses = [address for _, address in getaddresses([value])]
    if not addresses or not all(Directory.is_valid_address(a) for a in addresses):
        return None
    return addresses


def headers_allowed(session, message, require: str) -> bool:
    user = session.auth_user
    fields = _fields(message)
    if len(fields["from"]) != 1 or len(fields["sender"]) > 1:
        return False
    from_ = _addresses(fields["from"][0])
    sender = _addresses(fields["sender"][0]) if fields["sender"] else []
    if from_ is None or sender is None or len(sender) > 1:
        return False
    if require == "domain":
        return all(_domain(a) == _domain(user) for a in from_ + sender)
    me = _key(user)
    if all(_key(a) == me for a in from_):
        return True
    if sender and _key(sender[0]) == me:
        account = session.directory.user(user)
        send_as = {_key(a) for a in account.send_as} if account is not None else set()
        return all(_key(a) in send_as or _key(a) == me for a in from_)
    return False


@hookimpl
def on_data(session, transaction, message, settings):
    require = settings["require"]
    if session.auth_user is None or not settings["mime_headers"] or require == "none":
        return None
    if headers_allowed(session, message, require):
        return None
    return Reply(550, "5.7.1", "Message headers not owned by authenticated user")
