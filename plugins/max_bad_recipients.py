"""max_bad_recipients: close a session that tried ``limit`` non-existent local mailboxes.

A bad recipient is a RCPT answered ``550 5.1.1`` (by the core's ``mailbox`` check, or by any
plugin that looks recipients up). Relay denials (``5.7.1``) and other refusals do not count.
The count is per connection: it survives RSET, new transactions and STARTTLS.
"""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

NAME = "max_bad_recipients"
TOO_MANY = Reply(421, "4.7.0", "Too many bad recipients", close=True)


@hookimpl
def config_schema():
    return ingress_schemas.load("max_bad_recipients")


@hookimpl
def on_command(session, verb):
    session.notes[NAME] = verb  # on_reply does not say which command it answers


@hookimpl
def on_reply(session, reply, settings):
    if reply.code != 550 or reply.enhanced != "5.1.1" or session.notes.get(NAME) != "RCPT":
        return None
    session.counters["bad_recipients"] += 1
    limit = settings["limit"]
    if limit and session.counters["bad_recipients"] >= limit:
        return TOO_MANY
    return None
