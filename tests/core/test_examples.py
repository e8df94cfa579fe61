"""The shipped example configs validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "contrib" / "examples"


def test_example_config_is_valid():
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config",
                             str(EXAMPLES / "ingress.toml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def readme_config() -> str:
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_readme_config_example_is_valid(tmp_path):
    path = tmp_path / "readme.toml"
    path.write_text(readme_config())
    result = subprocess.run([sys.executable, "-m", "ingress", "check-config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_readme_password_hash_is_what_hash_password_makes_of_its_password():
    import argon2

    text = readme_config()
    password = text.split("echo '", 1)[1].split("'", 1)[0]
    stored = text.split('password_hash = "', 1)[1].split('"', 1)[0]
    assert argon2.PasswordHasher().verify(stored, password)
