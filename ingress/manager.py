"""Finding, loading and registering plugins. Private to the core.

Builtins and third-party plugins go through the same ``pluggy.PluginManager``. Builtins (one
module per documented setting, shipped as ``ingress_plugins``) are always active. Third-party
plugins come from the ``ingress.plugins`` entry point group or ``server.plugin_modules`` and are
active only when their ``[plugins.<name>]`` section is present: installing a package must never
change policy silently.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

import pluggy

from ingress import hookspecs
from ingress.errors import PluginError

# The setting plugins, in the order of the contract's table (docs and `ingress plugins` use it).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "banner",
    "relay",
    "session_timeout",
    "command_timeout",
    "max_connections",
    "max_messages",
    "disconnect_delivery",
    "max_bad_commands",
    "max_hop_count",
    "max_message_size",
    "max_bad_recipients",
    "received_header",
    "dsn",
    "auth_match",
    "local_delivery_auth",
    "auth",
    "vrfy",
    "expn",
)
BUILTIN_PACKAGE = "ingress_plugins"

# Core behaviour that is not a setting but is still expressed as plugins, so that other
# plugins can order themselves around it and replace it (e.g. another delivery backend).
CORE_PLUGINS: dict[str, str] = {
    "params": "ingress.checks",
    "mailbox": "ingress.checks:Mailbox",
    "delivery": "ingress.delivery",
    "metrics": "ingress.metrics",
}

ENTRY_POINT_GROUP = "ingress.plugins"

# Names listed here (comma-separated) are loaded for their schema but not registered: for tests
# that prove a behaviour comes from a plugin, and for emergencies.
DISABLE_ENV = "INGRESS_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin", "core", "entry point <dist>", "module <dotted.path>"
    plugin: object | None = None
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    @property
    def is_builtin(self) -> bool:
        return self.source in ("builtin", "core")


# Plugin objects made so far in this process, by where they come from: one object per plugin
# and process, so a reload (which loads the config again) reuses it rather than making another.
_objects: dict[tuple[str, str], object] = {}


def _instance(key: tuple[str, str], loaded: object) -> object:
    """The one object of a loaded plugin: a class is instantiated once per process."""
    if not isinstance(loaded, type):
        return loaded
    if key not in _objects:
        _objects[key] = loaded()
    return _objects[key]


def _load_object(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return _instance(("core", spec), getattr(module, attr)) if attr else module


def builtin_infos() -> list[PluginInfo]:
    infos = [
        PluginInfo(name, "builtin", importlib.import_module(f"{BUILTIN_PACKAGE}.{name}"))
        for name in BUILTIN_PLUGINS
    ]
    infos += [PluginInfo(name, "core", _load_object(spec)) for name, spec in CORE_PLUGINS.items()]
    return infos


def entry_point_infos() -> dict[str, PluginInfo]:
    """Installed third-party plugins by name; one that fails to import carries its error."""
    found: dict[str, PluginInfo] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        info = PluginInfo(ep.name, f"entry point {dist}")
        try:
            info.plugin = _instance((ep.name, ep.value), ep.load())
        except Exception as exc:  # any import-time failure of someone else's package
            info.error = f"{type(exc).__name__}: {exc}"
        found[ep.name] = info
    return found


def module_info(dotted: str) -> PluginInfo:
    try:
        module: ModuleType = importlib.import_module(dotted)
    except Exception as exc:
        return PluginInfo(dotted.rsplit(".", 1)[-1], f"module {dotted}",
                          error=f"{type(exc).__name__}: {exc}")
    name = getattr(module, "NAME", None) or dotted.rsplit(".", 1)[-1]
    return PluginInfo(name, f"module {dotted}", module)


def disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ingress")
    pm.add_hookspecs(hookspecs)
    return pm


def register(pm: pluggy.PluginManager, info: PluginInfo) -> None:
    """Register one plugin; a bad hook name, a hook option the core does not honour, or a clash
    is a :class:`PluginError` naming it."""
    try:
        pm.register(info.plugin, name=info.name)
        pm.check_pending()
        _refuse_unsupported_options(pm, info)
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.get_plugin(info.name) is info.plugin:
            pm.unregister(name=info.name)
        raise PluginError(f"plugin {info.name!r} ({info.source}): {exc}") from None
    info.hooks = sorted(c.name for c in pm.get_hookcallers(info.plugin) or [])


# pluggy hookimpl options the core's dispatcher does not implement: it walks implementations
# itself (ingress.dispatch), so a wrapper would never wrap anything.
UNSUPPORTED_OPTIONS = ("hookwrapper", "wrapper")
# Hooks called while a config is loaded, outside any event loop: plain functions only.
SYNC_ONLY_HOOKS = ("config_schema", "check_settings")


def _refuse_unsupported_options(pm: pluggy.PluginManager, info: PluginInfo) -> None:
    for caller in pm.get_hookcallers(info.plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not info.plugin:
                continue
            for option in UNSUPPORTED_OPTIONS:
                if getattr(impl, option, False):
                    raise ValueError(f"hook {caller.name} is marked {option}=True, which ingress "
                                     "does not support (use tryfirst or trylast to order it)")
            if caller.name in SYNC_ONLY_HOOKS and inspect.iscoroutinefunction(impl.function):
                raise ValueError(f"hook {caller.name} must be a plain def: it runs while the "
                                 "config is loaded, outside the event loop")
