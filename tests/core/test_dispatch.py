"""The hook dispatcher: plain functions inline, awaitables bounded, first reply wins."""

from __future__ import annotations

import asyncio
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from ingress import Reply, dispatch, hookimpl, hookspecs, manager
from ingress.auth import Mechanism
from ingress.config import Config
from ingress.delivery import Delivered
from ingress.errors import PluginError
from ingress.session import Recipient, Session, Transaction
from ingress.spool import Message
from ingress.state import Store


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


# --- declared semantics: Hooks.call runs what each specification declares ---------------------

SPECS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "ingress_spec"))
# What an implementation returns in the semantics test, by declared semantics.
ANSWER = {hookspecs.DECIDE: Reply(550, "5.7.1", "no"), hookspecs.FIRST: "first answer",
          hookspecs.COLLECT: ["item"]}


def test_every_hook_declares_its_semantics_and_types():
    assert "on_connect" in SPECS and "deliver" in SPECS
    # the names hookspecs imports only for type checking, to resolve its annotations
    names = {"Any": Any, "Mechanism": Mechanism, "Delivered": Delivered, "Reply": Reply,
             "Recipient": Recipient, "Session": Session, "Transaction": Transaction,
             "Message": Message, "Store": Store, "Config": Config, "Path": Path}
    for name in SPECS:
        assert hookspecs.semantics_of(name) in hookspecs.SEMANTICS, name
        function = getattr(hookspecs, name)
        parameters = inspect.signature(function).parameters
        hints = typing.get_type_hints(function, localns=names)
        assert set(hints) == {*parameters, "return"}, f"{name} lacks an annotation"
        # the plugin's own things come last: its settings, then its state store
        has_state = name not in ("config_schema", "check_settings", "startup", "config_loaded",
                                 "shutdown", "per_domain_statistics")
        tail = ["settings", "state"] if has_state else ["settings"]
        assert list(parameters)[-len(tail):] == tail, name


def test_a_spec_without_semantics_is_refused_with_a_clear_error(monkeypatch):
    @hookspecs.hookspec
    def on_something(session, settings):
        """not declared"""

    monkeypatch.setattr(hookspecs, "on_something", on_something, raising=False)
    with pytest.raises(TypeError, match=r"on_something declares no semantics.*@spec"):
        hookspecs.semantics_of("on_something")
    with pytest.raises(ValueError, match="unknown hook semantics"):
        hookspecs.spec("all")


def two_plugins(hook: str, seen: list[str]):
    """Two third-party plugins whose *hook* records its call and gives the answer its
    semantics uses (a refusal, a value, a list)."""
    answer = ANSWER[hookspecs.semantics_of(hook)]

    def plugin(name):
        @hookimpl
        def implementation():
            seen.append(name)
            return answer
        return name, types.SimpleNamespace(**{hook: implementation})

    return plugin("a"), plugin("b")


@pytest.mark.parametrize("hook", SPECS)
def test_call_follows_the_declared_semantics(hook):
    seen: list[str] = []
    table = hooks(*two_plugins(hook, seen))
    arguments = {n: None for n in inspect.signature(getattr(hookspecs, hook)).parameters
                 if n != "settings"}
    result = asyncio.run(table.call(hook, **arguments))
    semantics = hookspecs.semantics_of(hook)
    if semantics == hookspecs.COLLECT:
        assert (result, seen) == ([("a", ["item"]), ("b", ["item"])], ["a", "b"])
        seen.clear()
        assert table.call_sync(hook, **arguments) == result and seen == ["a", "b"]
    else:  # decide (a refusal) and first both stop at the first answer
        assert (result, seen) == ((ANSWER[semantics], "a"), ["a"])
        with pytest.raises(ValueError, match="not a collect hook"):
            table.call_sync(hook, **arguments)


def test_call_of_a_decision_hook_lets_a_positive_reply_vouch():
    seen: list[str] = []

    def plugin(name, reply):
        @hookimpl
        def on_rcpt():
            seen.append(name)
            return reply
        return name, types.SimpleNamespace(on_rcpt=on_rcpt)

    table = hooks(plugin("voucher", Reply.ok()), plugin("skipped", Reply(550, "5.7.1", "no")))
    result = asyncio.run(table.call("on_rcpt", session=None, transaction=None, recipient=None))
    assert (result, seen) == ((Reply.ok(), "voucher"), ["voucher"])
