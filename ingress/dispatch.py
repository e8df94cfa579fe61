"""Calling hooks: ordering, awaiting, first reply wins. Private to the core.

The core calls every hook through :meth:`Hooks.call`, which runs the semantics the hook's
specification declares (``ingress.hookspecs``: decide, first or collect).

pluggy calls implementations synchronously and, for decision hooks, would run all of them. The
core instead walks each hook's implementations itself, in a fixed order, one at a time; it awaits
results that are awaitable and stops at the first ``Reply``, remembering which plugin gave it.
The ordered tables are built once per config generation, so no lookup happens per command,
and each entry carries the plugin's settings already. A plain ``def`` implementation is called
inline (no coroutine, no task); only an ``async def`` one, or an awaitable result, is awaited.
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

from ingress import hookspecs
from ingress.errors import IngressError
from ingress.reply import Reply
from ingress.state import StateUnavailable

log = logging.getLogger("ingress.dispatch")

# The contract's order of checks, per hook; builtins not named here follow in registration order.
BUILTIN_ORDER: dict[str, tuple[str, ...]] = {
    "on_connect": ("max_connections",),
    "on_mail_from": ("max_messages", "params", "dsn", "max_message_size", "auth_match"),
    "on_rcpt": ("params", "dsn", "local_delivery_auth", "mailbox", "relay"),
    "on_data": ("max_message_size", "max_hop_count", "auth_match", "received_header"),
    "deliver": ("delivery",),
}

# Default of server.hook_timeout: every awaited hook call is bounded by it.
DEFAULT_HOOK_TIMEOUT = 60.0

FAILED = object()  # what a failed implementation "returned" from first()

TRACE = os.environ.get("INGRESS_TRACE_PLUGINS", "") not in ("", "0")

if sys.version_info >= (3, 11):
    async def _bounded(awaitable, seconds: float):
        """Await *awaitable* for at most *seconds* in the current task (no task per call,
        as ``asyncio.wait_for`` makes before Python 3.12)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    _bounded = asyncio.wait_for


@dataclass(frozen=True)
class Impl:
    plugin: str
    function: Any
    argnames: tuple[str, ...]
    is_async: bool
    wants_state: bool  # declares ``state``: gets its own Store of the session's server
    settings: Any  # the plugin's own config section, passed as ``settings``
    builtin: bool  # a builtin or core plugin: its checks run even after a third party vouched


class Hooks:
    """The ordered hook tables of one plugin manager plus each plugin's settings."""

    def __init__(self, pm: pluggy.PluginManager, settings: dict[str, Any], builtins: set[str],
                 timeout: float = DEFAULT_HOOK_TIMEOUT):
        self._pm = pm
        self.timeout = timeout  # seconds any one awaited implementation may take
        self._settings = settings
        self._builtins = builtins
        self._tables: dict[str, tuple[Impl, ...]] = {}

    def call(self, hook: str, **kwargs: Any):
        """Run *hook* as its specification declares; returns the awaitable of :meth:`decide`
        (``(reply, plugin)``), :meth:`first` (``(result, plugin)``) or :meth:`collect`
        (``[(plugin, result), ...]``)."""
        return _RUNNERS[hook](self, hook, kwargs)

    def call_sync(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """:meth:`call` outside the event loop, for a collect hook (``config_schema``)."""
        if _RUNNERS[hook] is not Hooks._collect:
            raise ValueError(f"hook {hook} is not a collect hook: it cannot be called sync")
        return self.collect_sync(hook, **kwargs)

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
            return (0 if hi.tryfirst else 3 if hi.trylast else 2, registration.get(name, 0))

        hookimpls.sort(key=key)
        return tuple(
            Impl(
                hi.plugin_name,
                hi.function,
                tuple(hi.argnames),
                inspect.iscoroutinefunction(hi.function),
                "state" in hi.argnames,
                self._settings.get(hi.plugin_name),
                hi.plugin_name in self._builtins,
            )
            for hi in hookimpls
        )

    @staticmethod
    def _start(hook: str, impl: Impl, kwargs: dict[str, Any]) -> Any:
        """Call *impl*: its result, or the awaitable an ``async def`` returned."""
        if TRACE:
            print(f"ingress: hook {hook} -> {impl.plugin}", file=sys.stderr)
        kwargs["settings"] = impl.settings
        if impl.wants_state:
            kwargs["state"] = kwargs["session"].state_backend.store(impl.plugin)
        return impl.function(*map(kwargs.__getitem__, impl.argnames))

    @staticmethod
    def _pending(impl: Impl, result: Any) -> bool:
        return impl.is_async or (result is not None and inspect.isawaitable(result))

    def _failed(self, hook: str, impl: Impl, exc: Exception) -> None:
        if isinstance(exc, StateUnavailable):
            return  # the state backend logs an outage once, not once per command
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            log.error("plugin %s did not answer %s within %gs", impl.plugin, hook, self.timeout)
        else:
            log.error("plugin %s failed in %s", impl.plugin, hook, exc_info=exc)

    # The semantics by name, whatever a hook declares (tests); the core uses call().
    def decide(self, hook: str, **kwargs: Any):
        return self._decide(hook, kwargs)

    def first(self, hook: str, **kwargs: Any):
        return self._first(hook, kwargs)

    def collect(self, hook: str, *, only: set[str] | None = None, **kwargs: Any):
        return self._collect(hook, kwargs, only)

    async def _decide(self, hook: str, kwargs: dict[str, Any]) -> tuple[Reply | None, str | None]:
        """Run a decision hook: the first refusal wins. Returns ``(reply, plugin)``.

        A positive ``Reply`` (2xx/3xx) from a builtin is the answer. One from a third-party
        plugin *vouches* for the command: the remaining third-party implementations are skipped,
        but the builtins' checks still run and may still refuse (a plugin's ``Reply.ok()`` never
        turns off relay control or size limits); if none does, the voucher is returned and the
        core carries out the command as usual, answering with the voucher's text."""
        vouched: tuple[Reply, str] | None = None
        for impl in self.impls(hook):
            if vouched is not None and not impl.builtin:
                continue
            try:
                result = self._start(hook, impl, kwargs)
                if self._pending(impl, result):
                    result = await _bounded(result, self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail closed
                self._failed(hook, impl, exc)
                return Reply.tempfail("Temporary local problem, try again later"), impl.plugin
            if result is not None:
                if not isinstance(result, Reply):
                    log.error("plugin %s returned %r from %s", impl.plugin, result, hook)
                    return Reply.tempfail(), impl.plugin
                if result.is_positive and not impl.builtin:
                    vouched = vouched or (result, impl.plugin)
                    continue
                return result, impl.plugin
        return vouched or (None, None)

    async def _first(self, hook: str, kwargs: dict[str, Any]) -> tuple[Any, str | None]:
        """Run until an implementation returns something other than ``None``. A failing
        implementation ends the walk with ``(FAILED, plugin)``."""
        for impl in self.impls(hook):
            try:
                result = self._start(hook, impl, kwargs)
                if self._pending(impl, result):
                    result = await _bounded(result, self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(hook, impl, exc)
                return FAILED, impl.plugin
            if result is not None:
                return result, impl.plugin
        return None, None

    async def _collect(self, hook: str, kwargs: dict[str, Any],
                       only: set[str] | None = None) -> list[tuple[str, Any]]:
        """Run every implementation (of the plugins named in *only*, when given); return
        ``(plugin, result)`` for each non-``None`` result. A failing implementation is logged
        and skipped."""
        results = []
        for impl in self.impls(hook):
            if only is not None and impl.plugin not in only:
                continue
            try:
                result = self._start(hook, impl, kwargs)
                if self._pending(impl, result):
                    result = await _bounded(result, self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(hook, impl, exc)
                continue
            if result is not None:
                results.append((impl.plugin, result))
        return results

    def call_one(self, hook: str, impl: Impl, **kwargs: Any) -> Any:
        """Call one implementation of a sync-only hook (``check_settings``); errors propagate."""
        return self._start(hook, impl, kwargs)

    async def run_all(self, hook: str, *, only: set[str] | None = None, **kwargs: Any) -> None:
        """Run every implementation (of the plugins named in *only*, when given), awaiting each
        (``startup``, ``config_loaded``). The first error ends the walk as an
        :class:`IngressError` naming the plugin."""
        for impl in self.impls(hook):
            if only is not None and impl.plugin not in only:
                continue
            try:
                result = self._start(hook, impl, kwargs)
                if self._pending(impl, result):
                    await result
            except IngressError:
                raise
            except Exception as exc:
                raise IngressError(f"plugin {impl.plugin} failed in {hook}: "
                                   f"{type(exc).__name__}: {exc}") from None

    def collect_sync(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`collect` for hooks called outside the event loop (``config_schema``).
        Errors propagate."""
        results = []
        for impl in self.impls(hook):
            result = self._start(hook, impl, kwargs)
            if result is not None:
                results.append((impl.plugin, result))
        return results


# Each hook's declared semantics, resolved once: call() costs one dict lookup.
_RUNNERS = {
    name: getattr(Hooks, "_" + hookspecs.semantics_of(name))
    for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "ingress_spec")
}
