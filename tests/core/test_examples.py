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
