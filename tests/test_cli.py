"""The CLI on a real SQLite database: status, dead letters, every subcommand's --help."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from api.cli import build_parser, main
from worker.sql import engines, models, schema


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path))
    for name in ("SIDECAR_DATABASE_URL", "SIDECAR_BROKER_URL", "SIDECAR_QDRANT_URL"):
        monkeypatch.delenv(name, raising=False)
    url = f"sqlite:///{tmp_path / 'sidecar.sqlite'}"
    schema.upgrade(url)
    return engines.make_engine(url)


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {
        "worker",
        "api",
        "emulator",
        "migrate",
        "demo",
        "spend",
        "status",
        "deadletters",
        "reconcile",
    } <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: sidecar " + name)


def test_status_json_contract(cli_env, capsys):
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["documents"]) >= {"pending", "indexed", "deleted", "rejected", "dead"}


def test_deadletters_list_and_retry(cli_env, capsys):
    with cli_env.begin() as conn:
        conn.execute(
            sa.insert(models.Document).values(
                tenant="t",
                collection="c",
                doc_id="poison",
                version=3,
                op="upsert",
                text="x",
                status="dead",
                attempts=9,
                last_error="provider rejected the text: moderation",
                created_at=models.utcnow(),
                updated_at=models.utcnow(),
            )
        )
    assert main(["deadletters", "list"]) == 0
    out = capsys.readouterr().out
    assert "poison" in out and "moderation" in out
    assert main(["deadletters", "retry", "999"]) == 1
    assert main(["deadletters", "retry", "--all"]) == 0
    assert "1 dead letter(s)" in capsys.readouterr().out
    with cli_env.connect() as conn:
        assert conn.execute(sa.select(models.Document.status, models.Document.attempts)).one() == (
            "pending",
            0,
        )


def test_spend_json_contract(cli_env, capsys):
    assert main(["spend", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["total"]) >= {"requests", "tokens", "cost_cny"} and "rows" in data


def test_bill_command_reconciles_and_exits_1_until_balanced(cli_env, tmp_path, capsys):
    from sqlalchemy.orm import Session

    from worker.ledger import calls

    with Session(cli_env) as session, session.begin():
        for rid in ("r1", "r2"):
            calls.open_request(
                session,
                request_id=rid,
                model="text-embedding-v4",
                dimensions=1024,
                api="compatible",
                rows=1,
                est_tokens=100,
                items=[],
                attempt=1,
                key_fingerprint=None,
                worker="w",
            )
        calls.close_abandoned(session, older_than=models.utcnow() + dt.timedelta(seconds=1))
    at = models.utcnow().timestamp() + 0.5
    bill = tmp_path / "bill.json"
    bill.write_text(
        json.dumps(
            {
                "total_tokens": 100,
                "requests": [
                    {
                        "request_id": "p1",
                        "model": "text-embedding-v4",
                        "api": "compatible",
                        "tokens": 100,
                        "at": at,
                    }
                ],
            }
        )
    )
    assert main(["bill", str(bill)]) == 1
    assert main(["bill", str(bill), "--apply", "--json"]) == 1  # unbalanced before the writes
    capsys.readouterr()
    assert main(["bill", str(bill), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["balanced"] and report["matched_by_id"] == 1 and report["ledger_tokens"] == 100
