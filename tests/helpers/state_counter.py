"""Test plugin: counts RCPT commands in the shared state and tells the count in its 250."""

from ingress import Reply, hookimpl


@hookimpl
def config_schema():
    return {"type": "object", "additionalProperties": False,
            "properties": {"ttl": {"type": "number", "default": 600}}}


@hookimpl
async def on_rcpt(settings, state):
    count = await state.incr("count", ttl=settings["ttl"])
    return Reply(250, "2.1.5", f"count {count}")
