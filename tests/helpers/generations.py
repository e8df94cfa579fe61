"""A class-based plugin (the entry point names the class) that notes its lifecycle calls, with
the object's identity, in the file its settings name; its greeting counts the connections this
object has seen. Across a reload, the same object must keep serving."""

import os

from ingress import hookimpl


class Recorder:
    def __init__(self):
        self.connections = 0

    def note(self, settings, line: str) -> None:
        with open(settings["record"], "a") as f:
            f.write(f"{line} {id(self)} {os.getpid()}\n")

    @hookimpl
    def config_schema(self):
        return {"type": "object", "additionalProperties": False, "required": ["record"],
                "properties": {"record": {"type": "string"},
                               "label": {"type": "string", "default": "one"},
                               "fail_loaded": {"type": "boolean", "default": False}}}

    @hookimpl
    async def startup(self, settings):
        self.note(settings, f"startup {settings['label']}")

    @hookimpl
    async def config_loaded(self, config, settings):
        self.note(settings, f"config_loaded {settings['label']} {config.hostname}")
        if settings["fail_loaded"]:
            raise RuntimeError("cannot take these settings")

    @hookimpl
    def shutdown(self, settings):
        self.note(settings, f"shutdown {settings['label']}")

    @hookimpl(tryfirst=True)  # before the banner builtin's
    def greeting(self, settings):
        self.connections += 1
        return f"{settings['label']} connection {self.connections}"
