"""A test plugin that shows which worker process took a connection and how many connections the
server had open then (``session.connections``), and refuses connections over ``limit`` the way
the max_connections plugin does: a global limit needs a global count."""

import os

from ingress import Reply, hookimpl

NAME = "connection_count"


@hookimpl
def config_schema():
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {"limit": {"type": "integer", "minimum": 0, "default": 0}},
    }


@hookimpl
def on_connect(session, settings):
    if settings["limit"] and session.connections > settings["limit"]:
        return Reply(421, "4.3.2", f"{session.hostname} Too many connections", close=True)
    return None


@hookimpl(tryfirst=True)
def greeting(session):
    return f"pid {os.getpid()} connections {session.connections}"
