"""A plugin that misspells a hook name."""

from ingress import hookimpl


@hookimpl
def on_conect(session):
    return None
