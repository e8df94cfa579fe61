"""max_hop_count: refuse a message that already passed through ``limit`` mail servers, counted
as the top-level ``Received:`` headers of the message as received (before ours is added)."""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl

TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")


@hookimpl
def config_schema():
    return ingress_schemas.load("max_hop_count")


@hookimpl
def on_data(message, settings):
    if message.header_count("Received") >= settings["limit"]:
        return TOO_MANY_HOPS
    return None
