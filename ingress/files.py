"""Reading config and directory files, which are untrusted input: bounded in size, in the
number of values, in nesting and in parsing time, whatever the format (TOML, YAML, JSON).
The one loader of the config (ingress.config) and of directory files (ingress.directory)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ingress.errors import ConfigError, pointer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


# Config files are untrusted input: bounded in size, in nesting and in parsing time.
MAX_FILE_BYTES = 1024 * 1024  # a config or directory file larger than this is refused
MAX_VALUES = 100_000  # a file of more values (scalars, lists, tables) is refused
MAX_PEM_BYTES = 1024 * 1024  # a tls_cert or tls_key file larger than this is refused
MAX_DEPTH = 64  # a value nested deeper than this (a JSON pointer with more parts) is refused
MAX_FILE_ERRORS = 20  # problems reported per file before giving up on it
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available


class FileError(ConfigError):
    """A config or directory file that cannot be used: ``problems`` holds ``(pointer, message)``
    pairs, the pointer saying where in the file (``""``: the whole file)."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        super().__init__([f"{path}: {where}: {message}" for where, message in problems])


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of *path*, refusing more than *limit* (a huge file is refused before it is
    read; a device or pipe is read no further than that)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise FileError(path, [("", f"file too large ({size} bytes; the limit is "
                                            f"{limit})")])
            data = file.read(limit + 1)
    except OSError as exc:
        raise FileError(path, [("", f"cannot read: {exc.strerror or exc}")]) from None
    if len(data) > limit:
        raise FileError(path, [("", f"file too large (over {limit} bytes)")])
    return data


_TOML_SPECIAL = re.compile(r"[\"'#]")
_TOML_BREAK = re.compile(r"[=\[\]{},\n]")
_TOML_BRACKET = re.compile(r"[\[\]{}]")


def _closing_quote(text: str, quote: str, start: int, end: int) -> int:
    """Index just past the *quote* (``"`` or ``\"\"\"``) that closes a basic string whose body
    starts at *start*, or *end* when none does before it; a quote after an odd number of
    backslashes is escaped. Each backslash is looked at once at most."""
    position = start
    while True:
        found = text.find(quote, position, end)
        if found < 0:
            return end
        first = found
        while first > start and text[first - 1] == "\\":
            first -= 1
        if (found - first) % 2 == 0:
            return found + len(quote)
        position = found + 1


def _toml_without_strings(text: str) -> str:
    """*text* with TOML strings and comments (which may hold anything) replaced by ``x`` (their
    newlines kept). Linear in time and memory whatever the strings hold."""
    parts = []
    position = 0
    while True:
        found = _TOML_SPECIAL.search(text, position)
        if found is None:
            parts.append(text[position:])
            return "".join(parts)
        start = found.start()
        parts.append(text[position:start])
        newline = text.find("\n", start)
        line_end = len(text) if newline < 0 else newline
        if text[start] == "#":
            end = line_end
        elif text.startswith("'''", start):
            close = text.find("'''", start + 3)
            end = len(text) if close < 0 else close + 3
        elif text[start] == "'":
            close = text.find("'", start + 1, line_end)
            end = line_end if close < 0 else close + 1
        elif text.startswith('"""', start):
            end = _closing_quote(text, '"""', start + 3, len(text))
        else:
            end = _closing_quote(text, '"', start + 1, line_end)
        parts.append("x" + "\n" * text.count("\n", start, end))
        position = end


def _check_toml_nesting(path: Path, text: str) -> None:
    """Refuse deep nesting before the TOML parser sees it: a dotted key of more than MAX_DEPTH
    parts (tomllib takes time quadratic in the parts of one key: 20,000 parts, 10 s) and inline
    arrays or tables nested more than MAX_DEPTH deep (parsed by recursion)."""
    bare = _toml_without_strings(text)

    def line(index: int) -> int:
        return bare.count("\n", 0, index) + 1

    depth = 0
    for bracket in _TOML_BRACKET.finditer(bare):
        depth += 1 if bracket[0] in "[{" else -1
        if depth > MAX_DEPTH:
            raise FileError(path, [("", f"line {line(bracket.start())}: nested deeper than "
                                        f"{MAX_DEPTH} levels")])
    position = 0
    for segment in _TOML_BREAK.split(bare):
        if segment.count(".") > MAX_DEPTH:
            raise FileError(path, [("", f"line {line(position)}: a dotted key of more than "
                                        f"{MAX_DEPTH} parts (nested deeper than {MAX_DEPTH} "
                                        "levels)")])
        position += len(segment) + 1


def _check_yaml_events(path: Path, text: str) -> None:
    """Walk the YAML event stream (flat, nothing built yet): refuse anchors and aliases, which
    let a few hundred bytes expand to gigabytes, and nesting deeper than MAX_DEPTH."""
    frames: list[list] = []  # per open collection: [is_mapping, key or index, expecting a key]
    count = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.DocumentStartEvent):
            frames = []
            continue
        if not isinstance(event, yaml.NodeEvent) and not isinstance(
                event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            frames.pop()
        else:
            parent = frames[-1] if frames else None
            if parent and parent[0] and parent[2]:  # this node is a key of its mapping
                parent[1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
            if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
                raise FileError(path, [(pointer(f[1] for f in frames), "YAML anchors and aliases "
                                        f"are not allowed (line {event.start_mark.line + 1})")])
            if len(frames) > MAX_DEPTH:
                raise FileError(path, [(pointer(f[1] for f in frames),
                                        f"nested deeper than {MAX_DEPTH} levels")])
            count += 1
            if count > MAX_VALUES:  # before the loader builds a node object for each
                raise FileError(path, [("", f"more than {MAX_VALUES} values")])
            if isinstance(event, yaml.CollectionStartEvent):
                frames.append([isinstance(event, yaml.MappingStartEvent), 0, True])
                continue
        if frames:  # a node is complete: its parent moves on
            parent = frames[-1]
            if parent[0]:
                parent[2] = not parent[2]
            else:
                parent[1] += 1


def _check_tree(path: Path, data: Any) -> None:
    """Refuse values nested deeper than MAX_DEPTH, numbers that are not finite, (YAML) mapping
    keys that are not strings, and more than MAX_VALUES values. Iterative: the tree may be
    deep; memory: one iterator per level."""
    problems: list[tuple[str, str]] = []
    where: list[Any] = []
    stack: list[Iterator[tuple[Any, Any]]] = [iter([(None, data)])]
    count = 0
    while stack and len(problems) < MAX_FILE_ERRORS:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            if where:
                where.pop()
            continue
        key, value = step
        if len(stack) > 1:
            where[-1] = key
        count += 1
        if count > MAX_VALUES:
            problems.append(("", f"more than {MAX_VALUES} values"))
            break
        if len(where) > MAX_DEPTH:
            problems.append((pointer(where), f"nested deeper than {MAX_DEPTH} levels"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((pointer(where), f"{value} is not allowed: numbers must be finite"))
        elif isinstance(value, (dict, list)):
            if isinstance(value, dict):
                problems.extend((pointer([*where, k]), f"key {k!r} is not a string (quote it)")
                                for k in value if not isinstance(k, str))
            stack.append(iter(value.items() if isinstance(value, dict) else enumerate(value)))
            where.append(None)
    if problems:
        raise FileError(path, problems[:MAX_FILE_ERRORS])


def read_file(path: Path) -> Any:
    """Parse a config or directory file: JSON (``.json``), YAML (``.yaml``, ``.yml``), else
    TOML. Raises :class:`FileError` for a file that is unreadable, too large, not UTF-8, not
    parsable, or hostile (YAML anchors, deep nesting, nan/inf), in bounded time and memory."""
    try:
        text = read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileError(path, [("", f"not UTF-8 text: {exc}")]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            _check_yaml_events(path, text)
            data = yaml.load(text, Loader=_YAML_LOADER)
        else:
            _check_toml_nesting(path, text)
            data = tomllib.loads(text)
    except RecursionError:  # a parser recursing per level: far deeper than MAX_DEPTH
        raise FileError(path, [("", f"nested deeper than {MAX_DEPTH} levels")]) from None
    except (ValueError, yaml.YAMLError) as exc:  # parse errors; also ints of 4,300+ digits
        message = " ".join(str(exc).split())  # parser messages span lines; ours may not
        if "maximum nesting depth" in message:  # libyaml's own limit (1,000) came first
            raise FileError(path, [("", f"nested deeper than {MAX_DEPTH} levels")]) from None
        raise FileError(path, [("", f"cannot parse: {message}")]) from None
    _check_tree(path, data)
    return data
