"""The benchmark harness runs end to end on a tiny load. No timing is asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import need

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def test_harness_runs_every_server_and_client_on_a_tiny_load(tmp_path):
    need("smtp-source")
    need("smtp-sink")
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--sizes", "2048", "--sessions", "2",
         "--messages", "6", "--repeat", "1", "--big-mb", "1", "--workdir", str(tmp_path),
         "--json", str(tmp_path / "results.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for client in ("smtp-source", "asyncio"):
        for server in ("ingress", "ingress-2w", "baseline", "sink"):
            for workload in ("2KB 1/conn x2", "2KB n/conn x2"):
                rows = [line for line in table
                        if f"| {client} | {workload} | {server} |" in line]
                assert len(rows) == 1, (client, server, workload, done.stdout)
                if server != "sink":
                    assert "| 6 | 0 | ok |" in rows[0], rows[0]
    assert any(line.startswith("| ingress / baseline |") for line in table)
    assert any(line.startswith("| ingress |") and "| ok |" in line for line in table)
    assert (tmp_path / "results.json").stat().st_size > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "results.json"], "work folders removed"
