"""Loading and validating the config file. Plugins may import :class:`Config` for type hints.

One :class:`Config` is one immutable generation: the validated, defaulted data, the directory,
the plugin manager built for it and its hook tables. A session keeps the generation it started
with, so a reload never changes a session mid-flight.
"""

from __future__ import annotations

import copy
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

import ingress_schemas
from ingress import ipnets, manager
from ingress.directory import Directory, DirectoryError
from ingress.dispatch import Hooks
from ingress.errors import ConfigError, PluginError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

EMBEDDED = "<embedded default>"

# `ingress serve` without --config: one local catch-all domain, everything under ./var.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "directory": {
        "domains": ["localhost"],
        "domain_settings": {"localhost": {"catch_all": True}},
    },
}


def read_file(path: Path) -> Any:
    """Parse TOML, JSON or YAML by the file's suffix (TOML by default)."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: cannot parse: {message}") from None


def pointer(parts) -> str:
    """RFC 6901 JSON pointer of a path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def apply_defaults(schema: dict, instance: Any) -> None:
    """Fill in ``default`` values of object properties, recursively, in place."""
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            apply_defaults(sub, instance[key])
            if sub.get("type") == "array" and isinstance(instance[key], list):
                for item in instance[key]:
                    apply_defaults(sub.get("items", {}), item)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                apply_defaults(extra, value)


def schema_errors(schema: dict, data: Any) -> list[tuple[str, str]]:
    """Every validation error as ``(pointer, message)``, unknown keys pointed at themselves."""
    validator = jsonschema.Draft202012Validator(schema)
    found = []
    for error in validator.iter_errors(data):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            patterns = error.schema.get("patternProperties", {})
            for key in error.instance:
                if key not in allowed and not patterns:
                    found.append((pointer(path + [key]), f"unknown key {key!r}"))
            continue
        found.append((pointer(path), error.message))
    return sorted(set(found))


def merged_schema(plugin_schemas: dict[str, dict | None]) -> dict:
    schema = copy.deepcopy(ingress_schemas.load("core"))
    props = schema["properties"]["plugins"]["properties"]
    for name, sub in sorted(plugin_schemas.items()):
        if sub is None:
            sub = {"type": "object", "additionalProperties": False}
        sub = dict(sub)
        sub.setdefault("default", {})
        props[name] = sub
    return schema


@dataclass(frozen=True)
class Config:
    """One validated config generation."""

    path: Path | None
    data: dict
    directory: Directory
    plugins: tuple[manager.PluginInfo, ...]
    hooks: Hooks
    schema: dict

    @property
    def source(self) -> str:
        return str(self.path) if self.path else EMBEDDED

    @property
    def server(self) -> dict:
        return self.data["server"]

    @property
    def hostname(self) -> str:
        return self.data["server"]["hostname"]

    def plugin_settings(self, name: str) -> dict | None:
        return self.data["plugins"].get(name)


def _discover(raw: dict, source: str) -> tuple[list[manager.PluginInfo], list[str]]:
    """The plugins this config activates, and errors about them."""
    errors: list[str] = []
    infos = manager.builtin_infos()
    builtin_names = {i.name for i in infos}
    sections = raw.get("plugins") if isinstance(raw.get("plugins"), dict) else {}
    candidates: dict[str, manager.PluginInfo] = {}
    for name, info in manager.entry_point_infos().items():
        if name in builtin_names:
            if name in sections:
                errors.append(f"{source}: {pointer(['plugins', name])}: third-party plugin "
                              f"{name!r} ({info.source}) has the name of a builtin plugin")
            continue
        candidates[name] = info
    server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
    modules = server.get("plugin_modules", [])
    for i, dotted in enumerate(modules if isinstance(modules, list) else []):
        if not isinstance(dotted, str):
            continue  # the schema reports it
        info = manager.module_info(dotted)
        where = pointer(["server", "plugin_modules", i])
        if info.error:
            errors.append(f"{source}: {where}: plugin module {dotted!r} failed to import: "
                          f"{info.error}")
        elif info.name in builtin_names:
            errors.append(f"{source}: {where}: plugin module {dotted!r} has the name of a "
                          f"builtin plugin ({info.name!r})")
        else:
            candidates[info.name] = info
    for name, info in candidates.items():
        if name not in sections:
            continue  # installed is not enabled
        if info.error:
            errors.append(f"{source}: {pointer(['plugins', name])}: plugin {name!r} "
                          f"({info.source}) failed to import: {info.error}")
            continue
        infos.append(info)
    return infos, errors


def build(raw: Any, path: Path | None, base_dir: Path,
          extra_plugins: dict[str, object] | None = None) -> Config:
    """Validate *raw* config data and build its generation; raises :class:`ConfigError`.

    *extra_plugins* (name: plugin object) are registered as third-party plugins whatever the
    config says (``ingress.testing`` uses this for plugins that are not installed)."""
    source = str(path) if path else EMBEDDED
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: : the config must be a table/mapping at the top level")
    raw = copy.deepcopy(raw)
    infos, errors = _discover(raw, source)
    for name, plugin in (extra_plugins or {}).items():
        infos.append(manager.PluginInfo(name, "test", plugin))
    if errors:
        raise ConfigError(errors)

    pm = manager.new_manager()
    disabled = manager.disabled_names()
    try:
        for info in infos:
            manager.register(pm, info)
    except PluginError as exc:
        raise ConfigError([f"{source}: {line}" for line in exc.lines]) from None
    builtins = {i.name for i in infos if i.is_builtin}
    schema_hooks = Hooks(pm, {}, builtins)
    plugin_schemas: dict[str, dict | None] = {i.name: None for i in infos}
    plugin_schemas.update(schema_hooks.call_sync("config_schema"))
    schema = merged_schema(plugin_schemas)

    problems = schema_errors(schema, raw)
    if problems:
        raise ConfigError([f"{source}: {p}: {m}" for p, m in problems])
    data = raw
    apply_defaults(schema, data)
    server = data["server"]
    if not server.get("hostname"):
        server["hostname"] = socket.gethostname()
    for section, key in (("delivery", "maildir"), ("delivery", "queue"),
                         ("server", "tls_cert"), ("server", "tls_key")):
        value = data[section][key]
        if value:
            data[section][key] = str((base_dir / value).resolve())
    if bool(server["tls_cert"]) != bool(server["tls_key"]):
        missing = "tls_key" if server["tls_cert"] else "tls_cert"
        raise ConfigError(f"{source}: {pointer(['server', missing])}: tls_cert and tls_key "
                          "go together")
    if server["listen_tls"] and not server["tls_cert"]:
        raise ConfigError(f"{source}: /server/listen_tls: implicit TLS listeners need "
                          "server.tls_cert and server.tls_key")
    bad_proxies = [f"{source}: {pointer(['server', 'proxy_protocol', i])}: {entry!r} is not an "
                   "IP address or CIDR network"
                   for i, entry in enumerate(server["proxy_protocol"])
                   if ipnets.parse_network(entry) is None]
    if bad_proxies:
        raise ConfigError(bad_proxies)
    try:
        directory = Directory.from_config(data["directory"], base_dir)
    except DirectoryError as exc:
        raise ConfigError([f"{source}: {p}: {m}" for p, m in exc.errors]) from None

    for name in disabled:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        pm.set_blocked(name)
    infos = [i for i in infos if i.name not in disabled]
    hooks = Hooks(pm, data["plugins"], builtins, timeout=data["server"]["hook_timeout"])
    return Config(path, data, directory, tuple(infos), hooks, schema)


def load(path: str | Path | None) -> Config:
    """Load the config file at *path*, or the embedded default when *path* is ``None``."""
    if path is None:
        return build(EMBEDDED_DEFAULT, None, Path.cwd())
    path = Path(path)
    return build(read_file(path), path, path.resolve().parent)


def full_schema() -> dict:
    """The merged schema of the core, every builtin and every importable installed plugin."""
    pm = manager.new_manager()
    infos = manager.builtin_infos()
    builtin_names = {i.name for i in infos}
    infos += [i for i in manager.entry_point_infos().values()
              if i.error is None and i.name not in builtin_names]
    for info in infos:
        manager.register(pm, info)
    hooks = Hooks(pm, {}, {i.name for i in infos if i.is_builtin})
    schemas: dict[str, dict | None] = {i.name: None for i in infos}
    schemas.update(hooks.call_sync("config_schema"))
    return merged_schema(schemas)
