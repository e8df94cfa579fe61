"""Every builtin has a schema, docs and tests; every hook is documented."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from ingress import hookspecs
from ingress.manager import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "ingress_spec"))


@pytest.mark.parametrize("name", BUILTIN_PLUGINS)
def test_builtin_has_module_schema_docs_and_tests(name):
    assert (ROOT / "plugins" / f"{name}.py").is_file()
    schema = json.loads((ROOT / "schemas" / f"{name}.json").read_text())
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    for key, sub in schema["properties"].items():
        assert "default" in sub, f"{name}.{key} has no default"
        assert sub.get("description"), f"{name}.{key} has no description"
    assert (ROOT / "docs" / "plugins" / f"{name}.md").is_file()
    assert (ROOT / "tests" / "plugins" / f"test_{name}.py").is_file()
    assert f"`{name}`" in (ROOT / "README.md").read_text()


def test_hook_list_is_complete():
    assert "on_connect" in HOOKS and "deliver" in HOOKS and len(HOOKS) >= 18


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    docs = (ROOT / "docs" / "hooks.md").read_text()
    assert re.search(rf"^### {hook}$", docs, re.M), f"docs/hooks.md lacks a section for {hook}"
    assert getattr(hookspecs, hook).__doc__.strip()


def signature(hook: str) -> str:
    """The hook's specification as docs/hooks.md shows it: name, typed arguments, return."""
    sig = inspect.signature(getattr(hookspecs, hook))
    arguments = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{hook}({arguments}) -> {sig.return_annotation}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_section_shows_its_exact_signature_and_semantics(hook):
    docs = (ROOT / "docs" / "hooks.md").read_text()
    section = docs.split(f"\n### {hook}\n", 1)[1].split("\n#", 1)[0]
    line = f"`{signature(hook)}` ({hookspecs.semantics_of(hook)})"
    assert section.startswith(line + "\n"), f"docs/hooks.md, {hook}: start with {line}"


def _runtime_imports(module: Path, core: set[str]) -> set[str]:
    """The core modules *module* imports when it runs: ``from ingress import x`` counts as
    ``ingress.x``; imports under ``if TYPE_CHECKING:`` (annotations only) do not count."""
    import ast

    found = set()

    def visit(node) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(module.read_text()))
    return {name for name in found if name in core}


def test_the_core_has_no_import_cycle():
    core = {}
    for path in (ROOT / "ingress").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        core[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _runtime_imports(path, set(core)) - {name, "ingress"}
             for name, path in core.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    assert "ingress.smtp" in graph and "ingress.delivery.maildir" in graph
    assert not sorted((a, b) for a in graph for b in graph[a] if reaches(b, a, {b}))


PRIVATE_ASYNCIO = re.compile(r"\._(buffer|transport|over_ssl|reader|writer|stream_reader)\b")


@pytest.mark.parametrize("module", ["connection", "smtp", "server", "proxy", "workers"])
def test_the_core_uses_no_private_asyncio_attribute(module):
    source = (ROOT / "ingress" / f"{module}.py").read_text()
    assert not PRIVATE_ASYNCIO.findall(source)
