"""max_messages: after `limit` accepted messages in a session, the next MAIL gets 421 4.7.0."""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("max_messages")


@hookimpl
def on_mail_from(session, settings):
    limit = settings["limit"]
    if limit and session.messages_accepted >= limit:  # counted across STARTTLS
        return Reply(421, "4.7.0", "Too many messages in this session", close=True)
    return None
