"""Expected errors: one clear message each, no traceback. Plugins may raise ``ConfigError``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple


def pointer(parts: Iterable[Any]) -> str:
    """The RFC 6901 JSON pointer of a path of keys and indexes (``""`` for the root): how every
    config error names the value it is about."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class IngressError(Exception):
    """An expected error: the CLI prints its lines and exits with :attr:`exit_code`."""

    exit_code = 2

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class ConfigError(IngressError):
    """The config file is invalid: each line is ``FILE: <json-pointer>: <message>``."""


class PluginError(IngressError):
    """A plugin could not be loaded (import error, unknown hook name, name clash)."""


class ConfigWarning(NamedTuple):
    """A setting that is valid but probably not what the operator wants (an open relay): a
    ``check_settings`` hook may return it among its problems. ``check-config`` prints it as
    ``FILE: <pointer>: warning: <message>`` and passes; the server logs it at start and reload."""

    pointer: str  # inside the plugin's section, like a problem's
    message: str
