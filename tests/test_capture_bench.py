"""`python -m bench.capture` runs end to end and prints every figure (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.worker_process import ROOT
from tests.test_capture_postgres import app_dsn  # noqa: F401 (a fixture)


@pytest.mark.slow
def test_capture_bench_prints_every_figure(app_dsn):  # noqa: F811
    argv = ["-m", "bench.capture", "--rows", "300", "--rate", "20", "--seconds", "3", "--dsn", app_dsn]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 300 and figures["snapshot_rows_per_s"] > 0
    assert figures["changes"] == 60 and figures["measured"] >= 50 and figures["p99_s"] >= figures["p50_s"] > 0
    assert "change -> searchable p50 s" in proc.stdout
