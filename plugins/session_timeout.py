"""session_timeout: cut a client that stays idle between commands (421 4.4.2 Session timeout).

The core runs the clock and decides what "idle" is (nothing received since the last reply, no
354 or 334 outstanding); this plugin only sets the duration.
"""

from __future__ import annotations

import ingress_schemas
from ingress import hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("session_timeout")


@hookimpl
def on_connect(session, settings):
    if settings["enabled"]:
        session.set_timeout("idle", settings["minutes"] * 60)
