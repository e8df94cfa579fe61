"""A third-party plugin with its own settings, used to test schema merging and activation."""

from ingress import Reply, hookimpl

NAME = "with_schema"


@hookimpl
def config_schema():
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {"greeting": {"type": "string", "default": "third-party hello"}},
    }


@hookimpl(tryfirst=True)  # before the builtin banner, which always answers
def greeting(settings):
    return settings["greeting"]


@hookimpl
def on_command(session, verb):
    if verb == "XPING":
        return Reply(250, "2.0.0", "XPONG")
