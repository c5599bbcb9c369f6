"""What operators see of change capture: GET /v1/sources, /metrics, /readyz and `sidecar status`."""

from __future__ import annotations

import json

import pytest

from api.cli import main
from tests.test_api import READ, broker, start_api  # noqa: F401 (broker is a fixture)
from worker.capture import state
from worker.sql import engines, schema


@pytest.fixture()
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def record(
    database_url: str, name: str, *, lag_s: float, lag_bytes: int | None, error: str | None = None
) -> None:
    engine = engines.make_engine(database_url)
    try:
        with engines.make_sessionmaker(engine).begin() as session:
            row = state.source_row(session, name, "postgres")
            row.phase = "streaming"
            state.record_batch(session, row, rows=120, rejected=2, position="0/16B3748", lag_s=lag_s)
            state.heartbeat(session, row, lag_bytes=lag_bytes, lag_s=lag_s)
        if error:
            with engines.make_sessionmaker(engine).begin() as session:
                state.record_error(session, name, "postgres", error)
    finally:
        engine.dispose()


def test_sources_in_the_api_metrics_and_readyz(database_url, broker, tmp_path):  # noqa: F811
    schema.upgrade(database_url)
    record(database_url, "articles", lag_s=1.5, lag_bytes=2048, error="OperationalError: connection refused")
    running, api = start_api(database_url, broker, tmp_path, capture_max_lag_s=60)
    try:
        with api.client(READ) as client:
            body = client.get("/v1/sources").json()
            [source] = body["sources"]
            assert source["name"] == "articles" and source["up"] and source["lag_bytes"] == 2048
            assert (
                source["rows_total"] == 120 and source["rejected_total"] == 2 and source["errors_total"] == 1
            )
            assert source["last_error"].startswith("OperationalError") and body["not_ready"] == []
            metrics = client.get("/metrics").text
            assert 'sidecar_source_lag_bytes{source="articles"} 2048' in metrics
            assert 'sidecar_source_lag_seconds{source="articles"} 1.5' in metrics
            assert 'sidecar_source_rows_total{source="articles"} 120' in metrics
            assert 'sidecar_source_errors_total{source="articles"} 1' in metrics
            assert 'sidecar_source_up{source="articles"} 1' in metrics
            assert client.get("/readyz").json()["checks"]["sources"]["ok"]

            record(database_url, "articles", lag_s=600.0, lag_bytes=4096)
            answer = client.get("/readyz")
            assert answer.status_code == 503
            assert any("articles: 600s behind" in r for r in answer.json()["reasons"])
        assert api.client(None).get("/v1/sources").status_code == 401
    finally:
        running.stop()


def test_a_silent_source_is_down():
    sources = [
        {"name": "a", "up": False, "lag_s": 0.0, "lag_bytes": 0},
        {"name": "b", "up": True, "lag_s": 1.0, "lag_bytes": 10**10},
        {"name": "c", "up": True, "lag_s": None, "lag_bytes": None},
    ]
    reasons = state.lagging(sources, max_lag_s=60, max_lag_bytes=10**9)
    assert len(reasons) == 2 and "a: capture not running" in reasons[0] and "b: slot holds" in reasons[1]


def test_status_shows_sources(database_url, monkeypatch, capsys, tmp_path):
    schema.upgrade(database_url)
    record(database_url, "articles", lag_s=0.5, lag_bytes=0)
    monkeypatch.setenv("SIDECAR_DATABASE_URL", database_url)
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sources"][0]["name"] == "articles" and report["sources"][0]["position"] == "0/16B3748"
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "sources" in text and "articles" in text and "0/16B3748" in text
