"""A third-party plugin whose settings name JSON Schema formats: check-config enforces them."""

import re

from ingress import Reply, hookimpl

NAME = "with_formats"


@hookimpl
def config_schema():
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "subject_pattern": {"type": "string", "format": "regex", "default": "^$"},
            "trusted_ip": {"type": "string", "format": "ipv4", "default": "192.0.2.1"},
            "trusted_ip6": {"type": "string", "format": "ipv6", "default": "2001:db8::1"},
            "network": {"type": "string", "format": "ip-network", "default": "192.0.2.0/24"},
        },
    }


@hookimpl
def on_mail_from(transaction, settings):
    # compiled per message on purpose: a pattern the schema let through would fail here
    if re.search(settings["subject_pattern"], transaction.mail_from):
        return Reply(550, "5.7.1", "matched")
    return None
