"""Expected errors: one clear message each, no traceback. Plugins may raise ``ConfigError``."""

from __future__ import annotations


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
