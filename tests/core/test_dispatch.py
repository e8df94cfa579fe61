"""The hook dispatcher: plain functions inline, awaitables bounded, first reply wins."""

from __future__ import annotations

import asyncio
import types

import pytest

from ingress import Reply, dispatch, hookimpl, manager
from ingress.errors import PluginError


class Sync:
    @hookimpl
    def on_helo(self, hostname, settings):
        return Reply(550, "5.7.1", f"{hostname} {settings['word']}") if hostname == "bad" else None


class Async:
    delay = 0.0

    @hookimpl
    async def on_helo(self, hostname):
        await asyncio.sleep(self.delay)
        return Reply(550, "5.7.1", "async says no") if hostname == "slow" else None


class ReturnsAwaitable:
    @hookimpl
    def on_helo(self, hostname):
        async def later():
            return Reply(550, "5.7.1", "awaited") if hostname == "later" else None
        return later()


def hooks(*plugins) -> dispatch.Hooks:
    pm = manager.new_manager()
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    return dispatch.Hooks(pm, {"sync": {"word": "refused"}}, builtins=set())


def test_plain_functions_are_called_inline_without_suspending():
    coro = hooks(("sync", Sync())).decide("on_helo", session=None, verb="HELO", hostname="bad")
    with pytest.raises(StopIteration) as done:  # finished at its first step: nothing awaited
        coro.send(None)
    assert done.value.value == (Reply(550, "5.7.1", "bad refused"), "sync")


def test_async_implementations_and_returned_awaitables_are_awaited_in_order():
    table = hooks(("sync", Sync()), ("async", Async()), ("later", ReturnsAwaitable()))

    async def decide(hostname):
        return await table.decide("on_helo", session=None, verb="HELO", hostname=hostname)

    assert asyncio.run(decide("slow")) == (Reply(550, "5.7.1", "async says no"), "async")
    assert asyncio.run(decide("later")) == (Reply(550, "5.7.1", "awaited"), "later")
    assert asyncio.run(decide("fine")) == (None, None)


def test_an_async_implementation_that_takes_too_long_fails_closed():
    slow = Async()
    slow.delay = 5
    table = hooks(("async", slow))
    table.timeout = 0.05

    async def decide():
        return await table.decide("on_helo", session=None, verb="HELO", hostname="x")

    reply, plugin = asyncio.run(asyncio.wait_for(decide(), 3))
    assert (reply.code, reply.enhanced, plugin) == (451, "4.3.0", "async")


class Greeter:
    def __init__(self, text, delay=0.0):
        self.text, self.delay = text, delay

    @hookimpl
    async def greeting(self):
        await asyncio.sleep(self.delay)
        return self.text


def test_first_result_hooks_are_bounded_too():
    table = hooks(("hung", Greeter("never", delay=3600)), ("next", Greeter("next")))
    table.timeout = 0.05

    async def first():
        return await table.first("greeting", session=None)

    assert asyncio.run(asyncio.wait_for(first(), 3)) == (dispatch.FAILED, "hung")


def test_tryfirst_and_trylast_order_third_party_implementations():
    seen = []

    def plugin(name, **options):
        @hookimpl(**options)
        def on_helo():
            seen.append(name)
        return name, types.SimpleNamespace(on_helo=on_helo)

    table = hooks(plugin("last", trylast=True), plugin("plain"), plugin("first", tryfirst=True),
                  plugin("plain2"))
    asyncio.run(table.decide("on_helo", session=None, verb="HELO", hostname="x"))
    assert seen == ["first", "plain", "plain2", "last"]


@pytest.mark.parametrize("option", ["hookwrapper", "wrapper"])
def test_wrapper_implementations_are_refused_at_registration(option):
    class Wrapping:
        @hookimpl(**{option: True})
        def on_helo(self):
            yield

    pm = manager.new_manager()
    info = manager.PluginInfo("wrapping", "module tests.wrapping", Wrapping())
    with pytest.raises(PluginError, match=f"'wrapping'.*on_helo.*{option}=True"):
        manager.register(pm, info)
    assert pm.get_plugin("wrapping") is None
