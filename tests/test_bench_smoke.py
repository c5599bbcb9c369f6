"""The throughput bench runs end to end and ends with one JSON line holding every figure.

Figures are checked for sanity, not against the speed targets (those are the bench's to print).
The window arithmetic it reports is checked from tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import max_window, percentile, rate_per_min

ROOT = Path(__file__).resolve().parents[1]

KEYS = {
    "ceiling_rows_per_min",
    "achieved_rows_per_min",
    "utilization",
    "rate_limited_ratio",
    "rows_per_request",
    "max_window_rpm",
    "max_window_tpm",
    "latency_p50_s",
    "latency_p99_s",
    "cpu_s_per_1k_events",
    "peak_rss_mb",
    "naive_utilization",
    "targets_met",
}


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([], (0, 0)),
        ([(0.0, 5)], (1, 5)),
        ([(0.0, 5), (30.0, 5), (59.9, 5), (60.0, 5), (119.95, 1)], (3, 15)),  # (t-60, t]: 0.0 leaves at 60.0
        ([(10.0, 100), (0.0, 1), (5.0, 1)], (3, 102)),  # unordered input
    ],
)
def test_max_window(entries, expected):
    assert max_window(entries) == expected


@pytest.mark.parametrize(
    ("entries", "cutoff", "expected"),
    [
        ([(0.0, 10), (6.0, 10), (12.0, 10)], None, 100.0),  # 20 rows over 12 s: the last one ends the span
        ([(0.0, 10), (6.0, 10), (12.0, 10)], 15.0, 120.0),  # 30 rows sent in the 15 s before the cut
        ([(0.0, 10)], None, 0.0),
        ([(20.0, 10)], 10.0, 0.0),
    ],
)
def test_rate_per_min(entries, cutoff, expected):
    assert rate_per_min(entries, cutoff=cutoff) == pytest.approx(expected)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile(list(range(1, 11)), 50) == 5
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([3.0], 99) == 3.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_throughput_bench_prints_every_figure(redis_url, postgres_server_url):
    redis_server = redis_url.rsplit("/", 1)[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.throughput",
            "--events",
            "60",
            "--rpm",
            "1200",
            "--tpm",
            "600000",
            "--latency-ms",
            "0",
            "--workers",
            "2",
            "--naive-s",
            "4",
            "--postgres-url",
            postgres_server_url,
            "--redis-url",
            redis_server,
            "--broker-db",
            "13",
            "--limiter-db",
            "10",
        ],  # not the bench's defaults: a bench may be running
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])

    assert result.keys() >= KEYS
    assert "ceiling rows/min" in proc.stdout  # the table came first
    assert result["ceiling_rows_per_min"] == pytest.approx(
        min(1200 * result["max_rows"], 600000 / result["mean_tokens_per_row"]), rel=1e-3
    )
    assert result["indexed"] == result["searchable_docs"] == 60
    assert result["ledger_rows"] >= 60
    assert result["achieved_rows_per_min"] > 0 and result["utilization"] > 0
    assert 0 <= result["rate_limited_ratio"] <= 1
    assert 1 <= result["rows_per_request"] <= result["max_rows"]
    assert 0 < result["max_window_rpm"] <= result["requests"]
    assert 0 < result["max_window_tpm"] <= result["tokens"]
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] < 60
    assert result["cpu_s_per_1k_events"] > 0 and result["peak_rss_mb"] > 50
    assert result["naive_rows_per_request"] == 1.0  # one document per claim: one row per request
    assert 0 < result["naive_utilization"] < 1
    assert set(result["targets_met"]) == {
        "utilization",
        "rate_limited_ratio",
        "rows_per_request",
        "max_window_rpm",
        "max_window_tpm",
    }
