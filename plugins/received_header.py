"""received_header: prepend a Received: trace header (all / unauthenticated / none), and always
one when the message has no Received header at all."""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import ingress_schemas
from ingress import hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("received_header")


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """The RFC 5322 date of a second (formatting it is dear; it changes once a second)."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def received(session, transaction) -> str:
    rcpt = ""
    if len(transaction.recipients) == 1:
        rcpt = f" for <{transaction.recipients[0].address}>"
    date = _date(int(time.time()))
    return (f"from {session.helo} ({session.ip_literal}) by {session.hostname} "
            f"with {session.transaction_protocol(transaction)} id {transaction.id}{rcpt}; {date}")


@hookimpl
def on_data(session, transaction, message, settings):
    mode = settings["append"]
    wanted = mode == "all" or (mode == "unauthenticated" and session.auth_user is None)
    if wanted or message.header_count("Received") == 0:
        transaction.add_header("Received", received(session, transaction))
