"""Each stack benchmark runs with --quick in a subprocess and ends with its JSON figures.

This keeps the benchmarks working; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = {
    "freshness.py": {"publish_to_recommendable_p99_ms", "event_to_effect_p99_ms", "peak_rss_mb"},
    "ranker.py": {
        "recommend_p99_ms_c1",
        "recommend_cold_p99_ms_c1",
        "recommend_half_busy_p99_ms_c1",
        "floor_p99_ms_c1",
        "overhead_ratio_c1",
        "recommend_qps_c8",
        "errors_c32",
        "peak_rss_mb",
    },
    "events.py": {
        "events_per_s_1_worker",
        "events_per_s_2_workers",
        "fold_alone_events_per_s",
        "recommend_p99_ms_during_backlog",
        "peak_rss_mb",
    },
}


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_quick_run_ends_with_its_figures(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert REQUIRED[script] <= set(figures), sorted(REQUIRED[script] - set(figures))
    assert figures["stack"].startswith("embedded") and figures["machine"]
