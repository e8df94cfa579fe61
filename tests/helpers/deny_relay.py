"""A third-party test plugin standing in for relay policy: every recipient outside the local
domains gets ``550 5.7.1 Relaying denied``."""

from ingress import Reply, hookimpl

NAME = "deny_relay"


@hookimpl
def on_rcpt(recipient):
    if not recipient.local:
        return Reply(550, "5.7.1", "Relaying denied")
    return None
