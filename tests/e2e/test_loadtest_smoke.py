"""The load test's 30-second smoke run, through `loadtests/run.py` and the real Locust,
against the session stack's gateway: every request must succeed.

No latency is asserted here (CI machines vary); `make loadtest` checks the p99 SLO.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SECONDS = 30
SMOKE_USERS = 2


def test_locust_smoke_run_has_no_failures(stack, tmp_path):
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "run.py"), "--target", stack.address,
         "--users", str(SMOKE_USERS), "--spawn-rate", str(SMOKE_USERS), "--duration", f"{SMOKE_SECONDS}s",
         "--slo-p99-ms", "0", "--results", str(results), "--prefix", "smoke",
         "--task-weights", "classify=1", "--task-models", "classify=resnet18", "--image-sizes", "320"],
        cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_SECONDS + 120)
    output = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, output

    with open(results / "smoke_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"Classify/resnet18", "Aggregated"}, rows.keys()
    classify = rows["Classify/resnet18"]
    assert int(classify["Request Count"]) > 0, output
    assert int(classify["Failure Count"]) == 0, output
    assert (results / "smoke.html").stat().st_size > 0
