"""Loading and validating the config file. Plugins may import :class:`Config` for type hints.

One :class:`Config` is one immutable generation: the validated, defaulted data, the directory,
the plugin manager built for it and its hook tables. A session keeps the generation it started
with, so a reload never changes a session mid-flight.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

import ingress_schemas
from ingress import ipnets, manager
from ingress.directory import Directory, DirectoryError
from ingress.dispatch import Hooks
from ingress.errors import ConfigError, ConfigWarning, PluginError, pointer
from ingress.files import MAX_PEM_BYTES, FileError, read_bounded, read_file
from ingress.state import check_url

EMBEDDED = "<embedded default>"

# `ingress serve` without --config: one local catch-all domain, everything under ./var.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "directory": {
        "domains": ["localhost"],
        "domain_settings": {"localhost": {"catch_all": True}},
    },
}


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


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?", re.ASCII)
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\[\]:]*)):(?P<port>[0-9]{1,5})",
                        re.ASCII)


def parse_host_port(value: str, *, listen: bool = False) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``[ipv6]:port``; raises ValueError saying what is
    wrong. The host is a name, an IPv4 address or (bracketed) an IPv6 address; with *listen*
    it may be empty (every interface) and the port 0 (any free port)."""
    found = _HOST_PORT.fullmatch(value)
    if not found:
        if value.count(":") > 1 and not value.startswith("["):
            raise ValueError(f"{value!r} is not host:port: write an IPv6 address in brackets, "
                             "as in [::1]:25")
        raise ValueError(f"{value!r} is not host:port (such as 127.0.0.1:25 or [::1]:25)")
    port = int(found["port"])
    if not (0 if listen else 1) <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} is out of range (1-65535"
                         f"{'; 0: any free port' if listen else ''})")
    if found["v6"] is not None:
        try:
            ipaddress.IPv6Address(found["v6"])
        except ValueError:
            raise ValueError(f"{value!r}: {found['v6']!r} is not an IPv6 address") from None
        return found["v6"], port
    host = found["host"]
    if not host and listen:
        return host, port
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or IPv4 address")
    return host, port


# Formats our schemas (and plugin schemas) may use; the message of a failed check is its error.
# Every format jsonschema knows (regex, ipv4, ipv6, email, date, ...: a schema that names one
# gets it enforced, so a value that would crash at run time is a config error instead) plus ours.
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("ip-network", raises=ValueError)
def _ip_network(value: Any) -> bool:
    if isinstance(value, str) and ipnets.parse_network(value) is None:
        raise ValueError(f"{value!r} is not an IP address or CIDR network")
    return True
FORMATS.checks("host-port", raises=ValueError)(
    lambda v: not isinstance(v, str) or bool(parse_host_port(v)))
FORMATS.checks("listen-address", raises=ValueError)(
    lambda v: not isinstance(v, str) or bool(parse_host_port(v, listen=True)))


def schema_errors(schema: dict, data: Any) -> list[tuple[str, str]]:
    """Every validation error as ``(pointer, message)``, unknown keys pointed at themselves."""
    validator = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
    found = []
    for error in validator.iter_errors(data):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            patterns = error.schema.get("patternProperties", {})
            for key in error.instance:
                if key not in allowed and not patterns:
                    found.append((pointer(path + [key]), _unknown_key(path, key)))
            continue
        if error.validator == "format" and error.cause is not None:
            found.append((pointer(path), _format_message(error)))
            continue
        found.append((pointer(path), error.message))
    return sorted(set(found))


def _unknown_key(path: list, key: str) -> str:
    if path == ["plugins"]:  # a section for a plugin the config does not load
        return (f"unknown key {key!r}: no plugin of that name is installed (neither a builtin, "
                "nor an entry point of group 'ingress.plugins', nor in server.plugin_modules)")
    return f"unknown key {key!r}"


def _format_message(error: jsonschema.ValidationError) -> str:
    """Our own formats explain themselves; jsonschema's say what the value should be."""
    if error.validator_value in ("host-port", "listen-address", "ip-network"):
        return str(error.cause)
    return f"{error.instance!r} is not a valid {error.validator_value}: {error.cause}"


def tls_problems(cert: str, key: str) -> list[tuple[str, str]]:
    """What is wrong with a certificate chain and private key pair (PEM files), checked the way
    the server loads them; ``(pointer, message)`` each."""
    problems = []
    for name, path, marker in (("tls_cert", cert, b"-----BEGIN CERTIFICATE-----"),
                               ("tls_key", key, b"PRIVATE KEY-----")):
        try:
            pem = read_bounded(Path(path), MAX_PEM_BYTES)
        except FileError as exc:
            problems.append((f"/server/{name}", f"{path}: {exc.problems[0][1]}"))
            continue
        if marker not in pem:
            what = "certificate" if name == "tls_cert" else "private key"
            problems.append((f"/server/{name}", f"{path}: no PEM {what} in this file"))
    if problems:
        return problems
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def no_passphrase() -> str:
        raise ValueError("the private key is encrypted (a key with a passphrase cannot be used)")

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ValueError as exc:
        return [("/server/tls_key", f"{key}: {exc}")]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [("/server/tls_key", f"{key}: this key does not belong to the certificate "
                                        f"in {cert}")]
        return [("/server/tls_cert", f"cannot load {cert} with {key}: {exc.reason or exc}")]
    except OSError as exc:
        return [("/server/tls_cert", f"cannot load {cert} with {key}: {exc.strerror or exc}")]
    return []


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
    warnings: tuple[str, ...] = ()  # FILE: /pointer: warning: message, from check_settings

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
    problem = check_url(server["state"])
    if problem:
        raise ConfigError(f"{source}: /server/state: {problem}")
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
    if server["tls_cert"]:
        problems = tls_problems(server["tls_cert"], server["tls_key"])
        if problems:
            raise ConfigError([f"{source}: {p}: {m}" for p, m in problems])
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
    problems, warnings = settings_problems(hooks, base_dir)
    if problems:
        raise ConfigError([f"{source}: {p}: {m}" for p, m in problems])
    return Config(path, data, directory, tuple(infos), hooks, schema,
                  tuple(f"{source}: {p}: warning: {m}" for p, m in warnings))


def settings_problems(hooks: Hooks, base_dir: Path) -> tuple[list[tuple[str, str]],
                                                             list[tuple[str, str]]]:
    """What each plugin's ``check_settings`` finds wrong, and what it warns about, as
    ``(pointer, message)`` with the pointer from the top of the config; a plugin that raises or
    answers nonsense is a problem of its section."""
    found: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    for impl in hooks.impls("check_settings"):
        section = pointer(["plugins", impl.plugin])
        try:
            answer = hooks.call_one("check_settings", impl, base_dir=base_dir)
            for problem in answer or ():
                where, message = ("", problem) if isinstance(problem, str) else problem
                if not isinstance(where, str) or not (where == "" or where.startswith("/")):
                    raise TypeError(f"{where!r} is not a JSON pointer")
                kind = warnings if isinstance(problem, ConfigWarning) else found
                kind.append((section + where, str(message)))
        except Exception as exc:  # someone else's code: report it, never a traceback
            found.append((section, f"plugin {impl.plugin} failed in check_settings: "
                                   f"{type(exc).__name__}: {exc}"))
    return found, warnings


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
