"""bench/store.py runs end to end at a tiny size and ends with one JSON line of sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_store_bench_runs_both_backends_and_prints_a_table_and_json():
    argv = ["-m", "bench.store", "--points", "60", "--dims", "16", "--queries", "20", "--local-queries", "5"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("filtered search q/s") for line in lines)
    result = json.loads(lines[-1])
    assert (result["points"], result["dims"]) == (60, 16)
    for backend, queries in (("edge", 20), ("local", 5)):
        figures = result[backend]
        assert figures["count"] == 60 and figures["queries"] == queries
        assert figures["ingest_points_per_s"] > 0 and figures["search_qps"] > 0
        assert 0 <= figures["search_p50_ms"] <= figures["search_p99_ms"]
        assert figures["rss_after_load_mb"] > 0 and figures["reopen_s"] >= 0
    assert result["edge"]["optimize_s"] >= 0
