"""Calling hooks: ordering, awaiting, first reply wins. Private to the core.

pluggy calls implementations synchronously and, for decision hooks, would run all of them. The
core instead walks each hook's implementations itself, in a fixed order, one at a time; it awaits
results that are awaitable and stops at the first ``Reply``, remembering which plugin gave it.
The ordered tables are built once per config generation, so no lookup happens per command.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from ingress.reply import Reply

log = logging.getLogger("ingress.dispatch")

# The contract's order of checks, per hook; builtins not named here follow in registration order.
BUILTIN_ORDER: dict[str, tuple[str, ...]] = {
    "on_connect": ("max_connections",),
    "on_mail_from": ("max_messages", "params", "dsn", "max_message_size", "auth_match"),
    "on_rcpt": ("params", "dsn", "local_delivery_auth", "mailbox", "relay"),
    "on_data": ("max_message_size", "max_hop_count", "auth_match", "received_header"),
    "deliver": ("delivery",),
}

# Async implementations of decision hooks that take longer than this fail closed (451 4.3.0).
HOOK_TIMEOUT = float(os.environ.get("INGRESS_HOOK_TIMEOUT", "60"))

FAILED = object()  # what a failed implementation "returned"

TRACE = os.environ.get("INGRESS_TRACE_PLUGINS", "") not in ("", "0")


@dataclass(frozen=True)
class Impl:
    plugin: str
    function: Any
    argnames: tuple[str, ...]
    is_async: bool


class Hooks:
    """The ordered hook tables of one plugin manager plus each plugin's settings."""

    def __init__(self, pm: pluggy.PluginManager, settings: dict[str, Any], builtins: set[str]):
        self._pm = pm
        self._settings = settings
        self._builtins = builtins
        self._tables: dict[str, tuple[Impl, ...]] = {}

    def impls(self, hook: str) -> tuple[Impl, ...]:
        table = self._tables.get(hook)
        if table is None:
            table = self._tables[hook] = self._build(hook)
        return table

    def has(self, hook: str) -> bool:
        return bool(self.impls(hook))

    def _build(self, hook: str) -> tuple[Impl, ...]:
        caller = getattr(self._pm.hook, hook)
        # get_hookimpls() lists in reverse call order; registration order is what we want.
        hookimpls = list(reversed(caller.get_hookimpls()))
        order = BUILTIN_ORDER.get(hook, ())
        registration = {name: i for i, (name, _) in enumerate(self._pm.list_name_plugin())}

        def key(hi: pluggy.HookImpl) -> tuple[int, int]:
            name = hi.plugin_name
            if name in self._builtins:
                rank = order.index(name) if name in order else len(order)
                return (1, rank * 10_000 + registration.get(name, 0))
            return (0 if hi.tryfirst else 2, registration.get(name, 0))

        hookimpls.sort(key=key)
        return tuple(
            Impl(
                hi.plugin_name,
                hi.function,
                tuple(hi.argnames),
                inspect.iscoroutinefunction(hi.function),
            )
            for hi in hookimpls
        )

    def _args(self, impl: Impl, kwargs: dict[str, Any]) -> list[Any]:
        kwargs["settings"] = self._settings.get(impl.plugin)
        return [kwargs[name] for name in impl.argnames]

    async def _call(self, hook: str, impl: Impl, kwargs: dict[str, Any], timeout: float | None):
        if TRACE:
            print(f"ingress: hook {hook} -> {impl.plugin}", file=sys.stderr)
        result = impl.function(*self._args(impl, kwargs))
        if impl.is_async or inspect.isawaitable(result):
            result = await (asyncio.wait_for(result, timeout) if timeout else result)
        return result

    async def _safe_call(self, hook: str, impl: Impl, kwargs: dict[str, Any],
                         timeout: float | None) -> Any:
        """The implementation's result, or :data:`FAILED` (logged) if it raised or timed out."""
        try:
            return await self._call(hook, impl, kwargs, timeout)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            log.error("plugin %s did not answer %s within %gs", impl.plugin, hook, timeout)
        except Exception:
            log.exception("plugin %s failed in %s", impl.plugin, hook)
        return FAILED

    async def decide(self, hook: str, **kwargs: Any) -> tuple[Reply | None, str | None]:
        """Run a decision hook: the first ``Reply`` wins. Returns ``(reply, plugin)``.
        A plugin that fails (raises, times out, returns something else) fails closed."""
        for impl in self.impls(hook):
            result = await self._safe_call(hook, impl, kwargs, HOOK_TIMEOUT)
            if result is None:
                continue
            if not isinstance(result, Reply):
                if result is not FAILED:
                    log.error("plugin %s returned %r from %s", impl.plugin, result, hook)
                return Reply.tempfail(), impl.plugin
            return result, impl.plugin
        return None, None

    async def first(self, hook: str, **kwargs: Any) -> tuple[Any, str | None]:
        """Run until an implementation returns something other than ``None``. A failing
        implementation ends the walk with ``(FAILED, plugin)``."""
        for impl in self.impls(hook):
            result = await self._safe_call(hook, impl, kwargs, None)
            if result is not None:
                return result, impl.plugin
        return None, None

    async def collect(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Run every implementation; return ``(plugin, result)`` for each non-``None`` result.
        A failing implementation is logged and skipped."""
        results = []
        for impl in self.impls(hook):
            result = await self._safe_call(hook, impl, kwargs, HOOK_TIMEOUT)
            if result is not None and result is not FAILED:
                results.append((impl.plugin, result))
        return results

    def collect_sync(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`collect` for hooks called outside the event loop (``config_schema``).
        Errors propagate."""
        results = []
        for impl in self.impls(hook):
            result = impl.function(*self._args(impl, kwargs))
            if result is not None:
                results.append((impl.plugin, result))
        return results
