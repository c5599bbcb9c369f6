"""`sidecar demo` end to end on the embedded defaults (no Redis, PostgreSQL, Qdrant server or key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_ingests_a_file_and_reports_a_matching_bill(tmp_path):
    events = [
        {
            "op": "upsert",
            "doc_id": f"n{i}",
            "version": 1,
            "collection": "notes",
            "text": f"Note {i} about {'tea' if i % 2 else 'maps'}.",
        }
        for i in range(30)
    ]
    events += [
        {"op": "delete", "doc_id": "n3", "version": 2, "collection": "notes"},
        {"op": "upsert", "doc_id": "n4", "version": 2, "collection": "notes", "text": "Note 4, again."},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "DASHSCOPE_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "api.cli",
            "demo",
            "--events",
            str(path),
            "--data-dir",
            str(tmp_path / "d"),
            "--query",
            "tea",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "documents: 29 indexed, 1 deleted, 1 events rejected, 0 dead letters, 0 pending" in out
    assert "points   : 29 in collection 'notes'" in out
    assert "matches the ledger" in out
    assert "search   : 'tea'" in out and "  1. " in out
