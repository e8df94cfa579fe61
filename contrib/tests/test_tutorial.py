"""The plugin-author docs work as written.

- docs/tutorial.md: every file it shows is, byte for byte, a file of contrib/hello_policy and
  the reverse (tox installs that package as the tutorial says and runs its tests); the
  commands it shows print what it says.
- README.md, "Write a plugin": its module and its test, copied into a fresh folder, pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = (ROOT / "docs" / "tutorial.md").read_text()
PACKAGE = ROOT / "contrib" / "hello_policy"
# Made by installing, testing or trying the package, not part of it.
GENERATED = {"__pycache__", ".pytest_cache", "var", "build"}

SHOWN_FILE = re.compile(r"^\*\*`([^`]+)`\*\*\n\n```[a-z]*\n(.*?)^```$", re.M | re.S)
CONSOLE = re.compile(r"^```console\n\$ (.*?)\n(.*?)^```$", re.M | re.S)


def shown_files() -> dict[str, str]:
    return {path: text for path, text in SHOWN_FILE.findall(TUTORIAL)}


def package_files() -> set[str]:
    files = set()
    for path in PACKAGE.rglob("*"):
        parts = path.relative_to(PACKAGE).parts
        if path.is_file() and not any(p in GENERATED or p.endswith(".egg-info") for p in parts):
            files.add("/".join(parts))
    return files


def console(command: str) -> str:
    """The output the tutorial shows for *command*."""
    for shown, output in CONSOLE.findall(TUTORIAL):
        if shown == command:
            return output
    raise AssertionError(f"the tutorial shows no output for {command!r}")


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    args = command.split("|")[0].split()
    assert args[0] == "ingress"
    return subprocess.run([sys.executable, "-m", "ingress", *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_the_tutorial_shows_every_file_of_the_package_as_it_is():
    shown = shown_files()
    assert set(shown) == package_files()
    for path, text in shown.items():
        assert (PACKAGE / path).read_text() == text, f"{path} differs from docs/tutorial.md"


def test_the_package_is_installed_with_its_entry_point():
    [entry] = [ep for ep in metadata.entry_points(group="ingress.plugins")
               if ep.name == "hello_policy"]
    assert entry.value == "hello_policy" and entry.dist.name == "ingress-hello-policy"
    module = entry.load()
    assert callable(module.on_helo)
    assert module.config_schema()["properties"]["refuse"]["default"] == ["localhost"]


@pytest.fixture
def project(tmp_path):
    shutil.copy(PACKAGE / "ingress.toml", tmp_path / "ingress.toml")
    return tmp_path


def test_ingress_plugins_lists_it_as_shown(project):
    command = "ingress plugins --config ingress.toml | grep hello_policy"
    result = run(command, project)
    assert result.returncode == 0, result.stderr
    [line] = console(command).splitlines()
    assert line in result.stdout.splitlines()


def test_check_config_accepts_the_config_and_names_a_misspelt_key(project):
    command = "ingress check-config ingress.toml"
    good, bad = [output for shown, output in CONSOLE.findall(TUTORIAL) if shown == command]
    result = run(command, project)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(re.escape(good).replace("…", r"\d+"), result.stdout)

    config = project / "ingress.toml"
    config.write_text(config.read_text().replace("refuse =", "refus ="))
    result = run(command, project)
    assert result.returncode == 2
    assert result.stderr == bad


def test_the_readme_example_plugin_and_its_test_pass(pytester):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write a plugin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    [module] = [b for b in blocks if b.startswith("# my_policy.py")]
    [test] = [b for b in blocks if "def test_" in b]
    pytester.makepyfile(my_policy=module, test_my_policy=test)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
