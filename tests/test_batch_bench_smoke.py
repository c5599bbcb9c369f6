"""`bench.backfill` runs end to end on both lanes and ends with one JSON line: every document
indexed, ledger = bill on each lane, and the batch lane at half the real-time cost."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_backfill_bench_prints_both_lanes_and_a_json_line():
    argv = ["-m", "bench.backfill", "--docs", "60", "--batch-duration-s", "1", "--poll-s", "0.2"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "ledger = bill" in done.stdout
    figures = json.loads(lines[-1])
    lanes = {lane["lane"]: lane for lane in figures["lanes"]}
    assert set(lanes) == {"realtime", "batch"}
    for lane in lanes.values():
        assert lane["documents_indexed"] == 60 and lane["ledger_equals_bill"] is True
    assert lanes["batch"]["ledger_rows"] == 1 and lanes["batch"]["bill_entries"] == 60
    assert lanes["batch"]["billed_tokens"] == lanes["realtime"]["billed_tokens"]
    assert Decimal(lanes["batch"]["cost_cny"]) * 2 == Decimal(lanes["realtime"]["cost_cny"])
