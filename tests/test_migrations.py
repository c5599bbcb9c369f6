"""Migrations upgrade and downgrade on SQLite and PostgreSQL; autogenerate finds no difference."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from worker.errors import SchemaOutdated
from worker.sql import engines, models, schema


def test_upgrade_downgrade_and_no_drift(database_url):
    engine = engines.make_engine(database_url)
    with pytest.raises(SchemaOutdated, match="sidecar migrate"):
        schema.check_schema(engine)

    schema.upgrade(database_url)
    schema.check_schema(engine)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), models.Base.metadata
        )
    assert diff == []

    schema.downgrade(database_url, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    schema.upgrade(database_url)
    schema.check_schema(engine)
    engine.dispose()


def test_cli_migrate_and_worker_refuses_outdated_schema(tmp_path, monkeypatch, capsys):
    from api.cli import main

    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    monkeypatch.delenv("SIDECAR_DATABASE_URL", raising=False)
    assert main(["worker"]) == 2
    assert "run `sidecar migrate` first" in capsys.readouterr().err
    assert main(["migrate"]) == 0
    assert f"schema at revision {schema.head_revision('sqlite://')}" in capsys.readouterr().out


def test_worker_refuses_a_model_that_cannot_serve_the_configuration(tmp_path, monkeypatch, capsys):
    from api.cli import main

    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SIDECAR_EMBEDDING_MODEL", "text-embedding-v2")
    assert main(["worker"]) == 2
    assert "SIDECAR_EMBEDDING_DIMENSIONS=1024" in capsys.readouterr().err
    monkeypatch.setenv("SIDECAR_EMBEDDING_MODEL", "text-embedding-v1")
    monkeypatch.setenv("SIDECAR_EMBEDDING_DIMENSIONS", "1536")
    monkeypatch.setenv("SIDECAR_REGION", "singapore")
    assert main(["worker"]) == 2
    assert "not served in SIDECAR_REGION='singapore'" in capsys.readouterr().err


def test_query_lane_revision_keeps_existing_ledger_rows_realtime(database_url):
    """0005 adds `lane` (existing rows become realtime) and a query row's collection and tenant."""
    schema.upgrade(database_url, "0004")
    engine = engines.make_engine(database_url)
    row = {
        "id": "r-1",
        "status": "succeeded",
        "model": "text-embedding-v4",
        "dimensions": 1024,
        "api": "compatible",
        "rows": 1,
        "est_tokens": 3,
        "attempt": 1,
        "created_at": "2026-11-21 07:00:00+00:00",
    }
    columns = ", ".join(row)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO provider_requests ({columns}) VALUES ({', '.join(':' + k for k in row)})"),
            row,
        )
    schema.upgrade(database_url, "0005")
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT lane, collection, tenant FROM provider_requests")).one()
    assert tuple(found) == ("realtime", None, None)
    schema.downgrade(database_url, "0004")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM provider_requests")).scalar_one() == 1
    assert "lane" not in {c["name"] for c in sa.inspect(engine).get_columns("provider_requests")}
    engine.dispose()
