"""expn: answer EXPN from the directory ("Enable EXPN command").

Enabled: an alias or list gets its members as one multi-line reply, one member per line
(``250-2.1.5 <member>`` ... ``250 2.1.5 <member>``), as configured (a nested list shows as itself,
not expanded); anything else ``550 5.1.1``. A bare local part names the aliases and lists with
that local part in any local domain (several: ``553 5.1.4``). Disabled (the default), the core
answers ``502 5.5.1 EXPN not available``.
"""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

NOT_A_LIST = Reply(550, "5.1.1", "Not an alias or list")


@hookimpl
def config_schema():
    return ingress_schemas.load("expn")


@hookimpl
def on_expn(session, address, settings):
    if not settings["enabled"]:
        return None
    directory = session.directory
    if "@" in address:
        names = [address]
    else:
        names = [f"{address}@{domain}" for domain in sorted(directory.domains)]
    groups = [g for g in map(directory.alias_members, names) if g is not None]
    if len(groups) > 1:
        return Reply(553, "5.1.4", "List ambiguous")
    if not groups:
        return NOT_A_LIST
    return Reply(250, "2.1.5", tuple(f"<{member}>" for member in groups[0]))
