"""max_connections: refuse connections over the limit with 421 4.3.2 at the greeting."""

from __future__ import annotations

import ingress_schemas
from ingress import Reply, hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("max_connections")


@hookimpl
def on_connect(session, settings):
    limit = settings["limit"]
    # session.connections is the core's exact count of served connections, this one included.
    if limit and session.connections > limit:
        return Reply(421, "4.3.2", f"{session.hostname} Too many connections", close=True)
    return None
