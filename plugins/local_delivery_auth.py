"""local_delivery_auth: enforce a domain's ``require_smtp_auth`` for local deliveries.

Enabled, an unauthenticated session whose MAIL FROM is in a local domain gets ``530 5.7.0
Authentication required`` for a recipient in a local domain whose
``[directory.domain_settings."<domain>"] require_smtp_auth`` is true: mail from
user1@example.com to user2@example.com must be authenticated even though it stays here. Mail from
other domains (ordinary inbound mail) and the null sender are not affected.
"""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


@hookimpl
def config_schema():
    return ingress_schemas.load("local_delivery_auth")


@hookimpl
def on_rcpt(session, transaction, recipient, settings):
    if not settings["enabled"] or session.auth_user is not None or not recipient.local:
        return None
    directory = session.directory
    sender = transaction.mail_from
    if not sender or not directory.is_local_address(sender):
        return None
    if directory.domain_settings(directory.split(recipient.address)[1]).require_smtp_auth:
        return AUTH_REQUIRED
    return None
