"""bench/console.py runs end to end on a small ledger and ends with one JSON line of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_console_bench_prints_a_table_and_json():
    args = ["--rows", "300", "--databases", "sqlite", "--repeat", "1", "--no-browser"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.console", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["database", "what"]
    figures = json.loads(lines[-1])
    assert figures["rows"] == 300 and figures["results"]["sqlite"]["pages_browser"] is None
    calls = figures["results"]["sqlite"]["calls"]
    assert {"/v1/status", "/v1/activity?minutes=60", "/v1/requests?limit=100"} <= set(calls)
    assert set(figures["results"]["sqlite"]["pages_http_ms"]) >= {"overview", "spend", "ledger"}
    assert isinstance(figures["target_met"], bool)
