"""A test plugin whose ``on_data`` takes a while, like a content filter: a client that hangs up
right after its final dot has surely been seen gone by the time the server decides whether to
store the message, however busy the machine running the tests."""

import asyncio

from ingress import hookimpl

NAME = "slow_data"


@hookimpl
def config_schema():
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {"seconds": {"type": "number", "minimum": 0, "default": 0.3}},
    }


@hookimpl
async def on_data(session, transaction, message, settings):
    await asyncio.sleep(settings["seconds"])
