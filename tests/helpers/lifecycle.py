"""A plugin with startup and shutdown hooks: it notes each call (and its process id) in the
file its settings name, and refuses to start when told to."""

import os

from ingress import hookimpl
from ingress.errors import IngressError

NAME = "lifecycle"


@hookimpl
def config_schema():
    return {"type": "object", "additionalProperties": False,
            "properties": {"record": {"type": "string", "default": ""},
                           "fail": {"enum": ["", "refuse", "raise"], "default": ""}}}


def note(settings, line: str) -> None:
    with open(settings["record"], "a") as f:
        f.write(f"{line} {os.getpid()}\n")


@hookimpl
async def startup(config, settings):
    if settings["fail"] == "refuse":
        raise IngressError("lifecycle: the service it needs says no")
    if settings["fail"] == "raise":
        raise RuntimeError("plugin bug")
    note(settings, f"startup {config.hostname}")


@hookimpl
def shutdown(settings):
    note(settings, "shutdown")
