"""disconnect_delivery: deliver a complete message whose client closed without waiting for the
reply ("Continue delivery if session is disconnected by client"), as legacy mailers do.

The core keeps processing, in order, what such a client sent before it closed, and asks the
``continue_after_disconnect`` hook before storing each message. Off (the default), the plugin
has no opinion and the core discards the message.
"""

from __future__ import annotations

import ingress_schemas
from ingress import hookimpl


@hookimpl
def config_schema():
    return ingress_schemas.load("disconnect_delivery")


@hookimpl
def continue_after_disconnect(settings):
    return True if settings["enabled"] else None
