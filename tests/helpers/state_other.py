"""Test plugin: writes the key state_counter counts under, in its own namespace."""

from ingress import hookimpl


@hookimpl
async def on_mail_from(state):
    await state.set("count", 1000)
    assert await state.get("count") == "1000"
