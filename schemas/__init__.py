"""JSON Schemas of the core and of every builtin plugin, shipped as package data."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def load(name: str) -> dict:
    """The schema ``<name>.json`` shipped in this package, as a dict."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8"))
