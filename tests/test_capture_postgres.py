"""`kind = "postgres"` sources on a throwaway cluster (tests/fixtures/pgcluster.py): snapshot then
stream, non-text updates cost nothing, TOAST, the row filter, truncate, resync, bad rows, drop-slot."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa

from tests.test_pipeline import drain
from worker.capture import runner, state
from worker.capture.postgres import PostgresCapture
from worker.capture.sources import Source, load_sources
from worker.sql.models import Document, ProviderRequest, RejectedEvent


@pytest.fixture()
def database_url(sqlite_url: str) -> str:
    """The sidecar's own database: SQLite here (the accept path is tested on both elsewhere)."""
    return sqlite_url


@pytest.fixture()
def app_dsn(pg_cluster):
    """A fresh application database on the throwaway cluster, with `public.articles`."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(pg_cluster.dsn())
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    dsn = pg_cluster.dsn(name)
    run_sql(
        dsn,
        "CREATE TABLE articles (id int PRIMARY KEY, title text NOT NULL, body text, lang text, "
        "views int DEFAULT 0, published boolean DEFAULT true)",
    )
    yield dsn
    with admin.cursor() as cur:
        for _ in range(50):  # a walsender outlives its client's close by a moment
            cur.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            try:
                cur.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s",
                    (name,),
                )
                break
            except psycopg2.errors.ObjectInUse:
                time.sleep(0.1)
        cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def run_sql(dsn: str, *statements: str, params: tuple = ()) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, params or None)
    finally:
        conn.close()


def sources_file(tmp_path: Path, dsn: str, **extra: str) -> list[Source]:
    lines = [
        "[[sources]]",
        'name = "articles"',
        'kind = "postgres"',
        f'dsn = "{dsn}"',
        'table = "public.articles"',
        'collection = "articles"',
        'doc_id = "a-{id}"',
        'text = "{title}\\n\\n{body}"',
        'metadata = ["lang", "views"]',
        *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()),
    ]
    path = tmp_path / "sources.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_sources(path)


def capture_once(rt, sources: list[Source]) -> None:
    failures = runner.run_sources(rt, sources, stop=threading.Event(), once=True)
    assert failures == []


def docs(rt) -> dict[str, Document]:
    with rt.sessions() as s:
        rows = s.execute(sa.select(Document).where(Document.collection == "articles")).scalars().all()
        return {d.doc_id: d for d in rows}


def live(rt) -> dict[str, str]:
    return {k: d.text for k, d in docs(rt).items() if d.op == "upsert"}


def test_snapshot_then_stream_then_no_tokens_for_a_non_text_update(make_runtime, app_dsn, tmp_path, emulator):
    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body, lang) "
        "SELECT i, 'title ' || i, 'body ' || i, 'en' FROM generate_series(1, 30) i",
    )
    rt = make_runtime(capture_snapshot_lane="realtime")
    sources = sources_file(tmp_path, app_dsn)
    capture_once(rt, sources)

    snapshot = docs(rt)
    assert len(snapshot) == 30 and snapshot["a-7"].text == "title 7\n\nbody 7"
    assert snapshot["a-7"].meta == {"lang": "en", "views": 0}
    consistent_point = {d.version for d in snapshot.values()}
    assert len(consistent_point) == 1  # every snapshot row: the slot's consistent point

    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body) VALUES (31, 'new', 'fresh')",
        "UPDATE articles SET body = 'changed' WHERE id = 2",
        "DELETE FROM articles WHERE id = 3",
    )
    capture_once(rt, sources)
    after = docs(rt)
    assert after["a-31"].text == "new\n\nfresh" and after["a-2"].text == "title 2\n\nchanged"
    assert after["a-3"].op == "delete"
    assert after["a-31"].version > consistent_point.pop()
    drain(rt)
    assert rt.store.count("articles") == 30

    with rt.sessions() as s:
        requests_before = s.execute(sa.select(sa.func.count()).select_from(ProviderRequest)).scalar_one()
    run_sql(app_dsn, "UPDATE articles SET views = views + 1 WHERE id <= 10")
    capture_once(rt, sources)
    assert docs(rt)["a-5"].meta == {"lang": "en", "views": 1}
    drain(rt)
    with rt.sessions() as s:
        requests_after = s.execute(sa.select(sa.func.count()).select_from(ProviderRequest)).scalar_one()
    assert requests_after == requests_before  # metadata changed, text did not: no provider call

    with rt.sessions() as s:
        [source] = state.report(s)
    assert source["name"] == "articles" and source["phase"] == "streaming" and source["up"]
    assert source["rows_total"] == 30 + 3 + 9 and source["lag_bytes"] is not None


def test_unchanged_toast_value_keeps_the_text(make_runtime, app_dsn, tmp_path, emulator, monkeypatch):
    from worker.capture import pgcatalog

    rereads = []
    original = pgcatalog.reread
    monkeypatch.setattr(pgcatalog, "reread", lambda *a: rereads.append(a[-1]) or original(*a))
    big = secrets.token_hex(40_000)  # 80 KB of noise: stored out of line (TOAST)
    run_sql(app_dsn, "INSERT INTO articles (id, title, body) VALUES (1, 'toast', %s)", params=(big,))
    rt = make_runtime(capture_snapshot_lane="realtime")
    sources = sources_file(tmp_path, app_dsn)
    capture_once(rt, sources)
    run_sql(app_dsn, "UPDATE articles SET views = 5, title = 'toasted' WHERE id = 1")
    capture_once(rt, sources)
    assert [row["body"] for row in rereads] == ["__debezium_unavailable_value"]  # it came unchanged
    doc = docs(rt)["a-1"]
    assert doc.text == f"toasted\n\n{big}"
    assert "__debezium_unavailable_value" not in doc.text


def test_row_leaving_the_filter_is_deleted(make_runtime, app_dsn, tmp_path, emulator):
    run_sql(
        app_dsn,
        "ALTER TABLE articles REPLICA IDENTITY FULL",
        "INSERT INTO articles (id, title, body, published) VALUES (1, 'a', 'x', true), (2, 'b', 'y', false)",
    )
    rt = make_runtime(capture_snapshot_lane="realtime")
    sources = sources_file(tmp_path, app_dsn, where="published")
    capture_once(rt, sources)
    assert set(live(rt)) == {"a-1"}
    run_sql(
        app_dsn,
        "UPDATE articles SET published = false WHERE id = 1",
        "UPDATE articles SET published = true WHERE id = 2",
    )
    capture_once(rt, sources)
    assert set(live(rt)) == {"a-2"} and docs(rt)["a-1"].op == "delete"


def test_filter_without_full_identity_is_refused_naming_the_fix(make_runtime, app_dsn, tmp_path):
    rt = make_runtime()
    sources = sources_file(tmp_path, app_dsn, where="published")
    failures = runner.run_sources(rt, sources, stop=threading.Event(), once=True)
    assert len(failures) == 1 and "REPLICA IDENTITY FULL" in failures[0]


def test_truncate_deletes_every_document_and_resync_repairs_drift(make_runtime, app_dsn, tmp_path, emulator):
    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body) SELECT i, 't' || i, 'b' || i FROM generate_series(1, 5) i",
    )
    rt = make_runtime(capture_snapshot_lane="realtime")
    sources = sources_file(tmp_path, app_dsn)
    capture_once(rt, sources)
    run_sql(
        app_dsn, "TRUNCATE articles", "INSERT INTO articles (id, title, body) VALUES (9, 'after', 'truncate')"
    )
    capture_once(rt, sources)
    assert set(live(rt)) == {"a-9"}

    # Drift from before capture: a document the table never held, and a row the sidecar lost.
    from worker.intake import ingest_events

    ingest_events(
        rt, [{"op": "upsert", "collection": "articles", "doc_id": "ghost", "text": "x", "version": 1}]
    )
    with rt.sessions.begin() as s:
        s.execute(sa.delete(Document).where(Document.doc_id == "a-9"))
    result = PostgresCapture(rt, sources[0], stop=threading.Event()).resync()
    assert result["rows"] == 1 and result["deleted"] == 1
    assert set(live(rt)) == {"a-9"}


def test_bad_rows_are_rejected_with_source_key_and_rule_and_the_stream_goes_on(
    make_runtime, app_dsn, tmp_path, emulator
):
    rt = make_runtime(capture_snapshot_lane="realtime")
    path = tmp_path / "s.toml"
    path.write_text(
        f'[[sources]]\nname = "articles"\nkind = "postgres"\ndsn = "{app_dsn}"\ntable = "public.articles"\n'
        'collection = "articles"\ndoc_id = "{title}"\ntext = "{body}"\n'
    )
    sources = load_sources(path)
    capture_once(rt, sources)
    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body) "
        "VALUES (1, 'ok', 'fine'), (2, 'empty', ''), (3, %s, 'long id')",
        "INSERT INTO articles (id, title, body) VALUES (4, 'after', 'still flows')",
        params=("x" * 600,),
    )
    capture_once(rt, sources)
    assert set(live(rt)) == {"ok", "after"}
    with rt.sessions() as s:
        reasons = sorted(s.execute(sa.select(RejectedEvent.field, RejectedEvent.reason)).all())
    assert [field for field, _ in reasons] == ["doc_id", "text"]
    assert all(reason.startswith("source articles key ") for _, reason in reasons)
    assert "empty" in reasons[1][1] and "512" in reasons[0][1]


def test_drop_slot_removes_slot_and_publication(make_runtime, app_dsn, tmp_path, emulator):
    from contextlib import closing

    from worker.capture import pgcatalog

    rt = make_runtime(capture_snapshot_lane="realtime")
    sources = sources_file(tmp_path, app_dsn)
    capture_once(rt, sources)
    with closing(pgcatalog.connect(app_dsn)) as conn:
        assert pgcatalog.slot_lsn(conn, "articles") is not None
        assert pgcatalog.drop_slot(conn, sources[0])
        assert pgcatalog.slot_lsn(conn, "articles") is None


def test_the_command_once_resync_and_drop_slot(app_dsn, database_url, tmp_path, monkeypatch, capsys):
    from api.cli import main
    from worker.sql import schema

    schema.upgrade(database_url)
    run_sql(app_dsn, "INSERT INTO articles (id, title, body) VALUES (1, 'one', 'x'), (2, 'two', 'y')")
    sources_file(tmp_path, app_dsn)
    path = str(tmp_path / "sources.toml")
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "SIDECAR_DATABASE_URL": database_url,
        "SIDECAR_DATA_DIR": str(tmp_path),
        "SIDECAR_CAPTURE_SNAPSHOT_LANE": "realtime",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["capture", "--sources", path, "--once"]) == 0
    assert main(["capture", "--sources", path, "--resync", "articles"]) == 0
    assert '"rows": 2' in capsys.readouterr().out
    assert main(["capture", "--sources", path, "--resync", "nope"]) == 2
    assert "no source named 'nope'" in capsys.readouterr().err
    assert main(["capture", "--sources", path, "--drop-slot", "articles"]) == 0
    assert "slot articles dropped" in capsys.readouterr().out
    monkeypatch.setenv("SIDECAR_DATABASE_URL", database_url)
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == []  # forgotten with its slot


def test_writes_during_the_snapshot_are_neither_missed_nor_doubled(make_runtime, app_dsn, tmp_path, emulator):
    run_sql(
        app_dsn,
        "INSERT INTO articles (id, title, body) SELECT i, 't' || i, 'b' FROM generate_series(1, 3000) i",
    )
    rt = make_runtime(capture_snapshot_lane="realtime", capture_batch_rows=200)
    sources = sources_file(tmp_path, app_dsn)
    done = threading.Event()

    def write() -> None:
        conn = psycopg2.connect(app_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            n = 0
            while not done.is_set():
                n += 1
                cur.execute("UPDATE articles SET body = %s WHERE id = %s", (f"w{n}", 1 + n * 7 % 3000))
                if n % 50 == 0:
                    cur.execute("DELETE FROM articles WHERE id = %s", (1 + n * 13 % 3000,))
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        capture_once(rt, sources)  # the snapshot runs while the table changes
    finally:
        done.set()
        writer.join()
    capture_once(rt, sources)
    conn = psycopg2.connect(app_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT id, title, body FROM articles")
        table = {f"a-{i}": f"{t}\n\n{b}" for i, t, b in cur.fetchall()}
    conn.close()
    assert live(rt) == table
