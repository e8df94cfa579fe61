"""A plugin that checks its settings beyond its schema (check_settings): a pattern that must
compile, a file that must exist (relative to the config's folder), and a plugin bug on request."""

import re

from ingress import Reply, hookimpl

NAME = "with_checks"


@hookimpl
def config_schema():
    return {"type": "object", "additionalProperties": False,
            "properties": {"patterns": {"type": "array", "items": {"type": "string"},
                                        "default": []},
                           "list_file": {"type": "string", "default": ""},
                           "low": {"type": "integer", "default": 1},
                           "high": {"type": "integer", "default": 2},
                           "bug": {"type": "boolean", "default": False}}}


@hookimpl
def check_settings(base_dir, settings):
    if settings["bug"]:
        raise KeyError("oops")
    problems = []
    for i, pattern in enumerate(settings["patterns"]):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append((f"/patterns/{i}", f"{pattern!r} does not compile: {exc}"))
    if settings["list_file"] and not (base_dir / settings["list_file"]).is_file():
        problems.append(("/list_file", f"no such file: {base_dir / settings['list_file']}"))
    if settings["low"] >= settings["high"]:
        problems.append("low must be below high")
    return problems


@hookimpl
def on_mail_from(transaction, settings):
    for pattern in settings["patterns"]:
        if re.search(pattern, transaction.mail_from):
            return Reply(550, "5.7.1", "matched")
    return None
