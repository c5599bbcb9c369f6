"""`sidecar spend` groupings, CSV and JSON; `sidecar estimate` priced by hand."""

from __future__ import annotations

import csv
import io
import json
import math

from api.cli import main
from tests.test_api import ledger_for_spend
from worker import chunking, tokens
from worker.sql import engines, schema


def test_spend_groupings_csv_and_json(sqlite_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SIDECAR_DATABASE_URL", sqlite_url)
    schema.upgrade(sqlite_url)
    engine = engines.make_engine(sqlite_url)
    with engines.make_sessionmaker(engine).begin() as s:
        ledger_for_spend(s)
    engine.dispose()

    assert main(["spend", "--by", "collection", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["collection"], r["tokens"], r["cost_cny"], r["tokens_avoided_dedup"]) for r in rows] == [
        ("docs", "131", "0.000065375", "12"),
        ("faq", "10", "0.000005125", "0"),
        ("total", "141", "0.000070500", "12"),
    ]

    assert main(["spend", "--by", "day", "--since", "2026-11-21", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["requests"] == 1 and data["total"]["tokens_avoided_coalesced"] == 5

    assert main(["spend"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["day", "model", "requests"]
    assert table[-1].split()[0] == "total" and table[-1].split()[-1] == "0.000070500"
    assert len(table) == 2 + 3 + 1  # head, rule, (20th v3, 20th v4, 21st v4), total


def test_estimate_prices_a_backfill_before_sending(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SIDECAR_REQUESTS_PER_MINUTE", "30")
    monkeypatch.setenv("SIDECAR_TOKENS_PER_MINUTE", "600")
    texts = [f"note {i}: tea grows best on hillsides with morning mist" for i in range(23)]
    events = [{"op": "upsert", "doc_id": f"d{i}", "text": t, "version": 1} for i, t in enumerate(texts)]
    events += [
        {"op": "upsert", "doc_id": "d0", "text": "an older draft that never ships", "version": 0},
        {"op": "upsert", "doc_id": "copy", "text": texts[1]},  # same text as d1: embedded once
        {"op": "delete", "doc_id": "gone"},
        {"op": "upsert", "doc_id": "bad"},
    ]
    path = tmp_path / "backfill.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n\nnot json\n")

    assert main(["estimate", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    counts = [tokens.count_tokens(chunking.split_text(t, max_tokens=8000)[0].text) for t in texts]
    total = sum(counts)
    assert (data["events"], data["invalid"], data["documents"], data["deletes"]) == (28, 2, 25, 1)
    assert [bad["line"] for bad in data["invalid_examples"]] == [27, 29]
    assert (data["chunks"], data["rows"], data["requests"]) == (24, 23, 3)  # 23 rows, 10 a request
    assert data["tokens"] == total
    assert data["tokens_avoided"] == {
        "dedup": counts[1],
        "coalesced": tokens.count_tokens("an older draft that never ships"),
    }
    assert (
        data["cost_cny"] == f"{total * 5 / 10**7:.9f}"
        and data["batch_cost_cny"] == f"{total * 25 / 10**8:.9f}"
    )
    assert math.isclose(data["min_duration_s"], max(3 / 0.5, total / 10), rel_tol=1e-3)

    assert main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "least time" in out and "line 27: text: required for upsert; a string" in out
    assert main(["estimate", str(tmp_path / "missing.jsonl")]) == 2
