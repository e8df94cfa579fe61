"""vrfy: answer VRFY from the directory ("Enable VRFY command").

Enabled: a local user gets ``250 2.1.5 <name> <address>``; an alias, a list or a mailbox of a
catch-all domain (anything RCPT would accept as local) gets ``250 2.1.5 <address>``; anything else
``550 5.1.1``. A bare local part (``VRFY alice``) names the users with that local part in any
local domain; several get ``553 5.1.4 User ambiguous``. Disabled (the default), the core answers
``252 2.5.2``.
"""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

UNKNOWN = Reply(550, "5.1.1", "User unknown")


@hookimpl
def config_schema():
    return ingress_schemas.load("vrfy")


def _user_line(user) -> str:
    return f"{user.name} <{user.address}>" if user.name else f"<{user.address}>"


@hookimpl
def on_vrfy(session, address, settings):
    if not settings["enabled"]:
        return None
    directory = session.directory
    if "@" not in address:
        users = [u for u in (directory.user(f"{address}@{d}") for d in sorted(directory.domains))
                 if u is not None]
        if len(users) > 1:
            return Reply(553, "5.1.4", "User ambiguous")
        return Reply(250, "2.1.5", _user_line(users[0])) if users else UNKNOWN
    user = directory.user(address)
    if user is not None:
        return Reply(250, "2.1.5", _user_line(user))
    if directory.is_local_address(address) and directory.mailbox_exists(address):
        return Reply(250, "2.1.5", f"<{directory.normalise(address)}>")
    return UNKNOWN
