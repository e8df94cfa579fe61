"""bench/proxy.py runs end to end on a tiny load. No timing is asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import need

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "proxy.py"


def test_proxy_bench_runs_every_variant_on_a_tiny_load(tmp_path):
    need("smtp-source")
    need("haproxy")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--sessions", "2", "--messages", "6",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for variant in ("plain", "proxy-v2", "direct"):
        assert f"round 1 {variant}" in done.stdout and "(6 acked" in done.stdout
    assert "check: ok (18 stored = acknowledged)" in done.stdout
    assert list(tmp_path.iterdir()) == [], "work folder removed"
