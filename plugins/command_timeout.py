"""command_timeout: cut a client that stalls inside a command (421 4.4.2 Command timeout).

A partial command line, the DATA body after 354 (even before its first byte) and an AUTH
response after 334 run on this timer; the core restarts it on every byte received, so data that
keeps flowing is never cut. This plugin only sets the duration, and with ``min_data_rate`` the
rate a DATA body must keep up after a grace of ``seconds`` (the core applies it).
"""

from __future__ import annotations

import ingress_schemas
from ingress import hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("command_timeout")


@hookimpl
def on_connect(session, settings):
    session.set_timeout("command", settings["seconds"])
    session.set_min_data_rate(settings["min_data_rate"], grace=settings["seconds"])
