"""Change capture from PostgreSQL: snapshot rows per second, then change → searchable latency.

    python -m bench.capture [--rows 20000] [--rate 50] [--seconds 30] [--latency-ms 50]

A throwaway PostgreSQL cluster with wal_level=logical (tests/fixtures/pgcluster.py; or `--dsn`
of a database on a logical cluster), a table of `--rows` rows, the emulator in its own process
answering in `--latency-ms`, and in this process the capture of one source plus two embedding
threads on Qdrant Edge and a SQLite ledger (or `--database-url`).

1. Snapshot: from the capture's start until every row is committed as a document state
   (rows per second), and until every row is searchable (written to the store).
2. Steady changes: one UPDATE of a random row every 1/`--rate` s for `--seconds`; each change's
   latency runs from its commit in the application's database to the moment its document is
   indexed with the new text (written to the store, so a search finds it): p50 and p99.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import sqlalchemy as sa

from bench.common import EmulatorProcess, percentile
from worker.capture import pgcatalog, runner
from worker.capture.sources import Source
from worker.chunking import content_hash
from worker.runtime import build_runtime
from worker.service import EmbedService
from worker.settings import Settings
from worker.sql import schema
from worker.sql.models import Document
from worker.sql.source_models import CaptureSource


@contextlib.contextmanager
def app_database(dsn: str | None) -> Iterator[str]:
    """`--dsn`, or a database on a throwaway logical cluster."""
    if dsn:
        yield dsn
        return
    from tests.fixtures.pgcluster import throwaway_cluster

    with throwaway_cluster() as cluster:
        yield cluster.dsn()


def prepare_table(dsn: str, rows: int) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_docs")
        cur.execute("CREATE TABLE bench_docs (id int PRIMARY KEY, title text, body text)")
        cur.execute(
            "INSERT INTO bench_docs SELECT i, 'Document ' || i, "
            "'Shipping and returns note number ' || i || ' for the bench.' FROM generate_series(1, %s) i",
            (rows,),
        )
        cur.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench'"
        )
        cur.execute("DROP PUBLICATION IF EXISTS sidecar_bench")
    conn.close()


def drop_slot(source: Source) -> None:
    """Leave no slot behind (it would hold WAL): its walsender may outlive the capture a moment."""
    assert source.dsn is not None
    for _ in range(50):
        try:
            with contextlib.closing(pgcatalog.connect(source.dsn)) as conn:
                pgcatalog.drop_slot(conn, source)
            return
        except psycopg2.errors.ObjectInUse:
            time.sleep(0.1)


def counts(rt: Any) -> tuple[int, int, str | None]:
    """(rows committed by the capture, documents indexed, capture phase)."""
    with rt.sessions() as s:
        source = s.get(CaptureSource, "bench")
        indexed = s.execute(
            sa.select(sa.func.count()).select_from(Document).where(Document.status == "indexed")
        ).scalar_one()
    return (source.rows_total if source else 0), indexed, (source.phase if source else None)


def steady_changes(dsn: str, rt: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Updates at `rate` per second; for each, the time until its new text is committed as the
    document's desired state (the capture's part) and until it is indexed (searchable)."""
    pending: dict[str, tuple[float, str]] = {}  # doc_id → (commit time, text hash)
    accepted: dict[str, float] = {}
    to_accept: list[float] = []
    to_index: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def update() -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        rng, interval, start = random.Random(7), 1.0 / args.rate, time.monotonic()
        with conn.cursor() as cur:
            for n in range(int(args.rate * args.seconds)):
                time.sleep(max(0.0, start + n * interval - time.monotonic()))
                row, body = rng.randint(1, args.rows), f"Changed text {n} {uuid.uuid4().hex[:8]}."
                cur.execute("UPDATE bench_docs SET body = %s WHERE id = %s RETURNING title", (body, row))
                (title,) = cur.fetchone() or ("",)
                with lock:
                    pending[f"d{row}"] = (time.monotonic(), content_hash(f"{title}\n\n{body}"))
                    accepted.pop(f"d{row}", None)
        conn.close()
        done.set()

    updater = threading.Thread(target=update, daemon=True)
    updater.start()
    deadline = None
    while not (done.is_set() and not pending):
        if done.is_set():
            deadline = deadline or time.monotonic() + 120
            if time.monotonic() > deadline:
                break
        with lock:
            waiting = dict(pending)
        if waiting:
            found = _states(rt, list(waiting))
            now = time.monotonic()
            with lock:
                for doc_id, text_hash, status, indexed_hash in found:
                    if doc_id not in pending:
                        continue
                    at, expected = pending[doc_id]
                    if text_hash == expected and doc_id not in accepted:
                        accepted[doc_id] = now
                        to_accept.append(now - at)
                    if status == "indexed" and indexed_hash == expected:
                        to_index.append(now - pending.pop(doc_id)[0])
        time.sleep(0.02)
    return {
        "changes": int(args.rate * args.seconds),
        "measured": len(to_index),
        "accepted_p50_s": round(percentile(to_accept, 50) or 0.0, 3),
        "accepted_p99_s": round(percentile(to_accept, 99) or 0.0, 3),
        "p50_s": round(percentile(to_index, 50) or 0.0, 3),
        "p99_s": round(percentile(to_index, 99) or 0.0, 3),
        "max_s": round(max(to_index, default=0.0), 3),
    }


def _states(rt: Any, doc_ids: list[str]) -> list[Any]:
    """(doc_id, text_hash, status, indexed_hash) of these documents (by the unique key's index)."""
    with rt.sessions() as s:
        return list(
            s.execute(
                sa.select(Document.doc_id, Document.text_hash, Document.status, Document.indexed_hash).where(
                    Document.tenant == "default", Document.collection == "bench", Document.doc_id.in_(doc_ids)
                )
            ).all()
        )


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    emulator = EmulatorProcess(root / "emulator.log", latency_ms=args.latency_ms)
    database_url = args.database_url or f"sqlite:///{root / 'sidecar.sqlite'}"
    settings = Settings(
        _env_file=None,
        data_dir=root,
        database_url=database_url,
        dashscope_url=emulator.url,
        dashscope_api_key="sk-emulator",
        requests_per_minute=10**6,
        tokens_per_minute=10**9,
        batch_max_delay_s=0.05,
        capture_snapshot_lane="realtime",
        capture_idle_s=0.05,
        edge_optimize_after_points=10**9,
    )
    schema.upgrade(database_url)
    rt = build_runtime(settings)
    service = EmbedService(rt, threads=2, reconcile=False)
    stop = threading.Event()
    try:
        with app_database(args.dsn) as dsn:
            prepare_table(dsn, args.rows)
            source = Source(
                name="bench", kind="postgres", collection="bench", doc_id="d{id}", text="{title}\n\n{body}",
                dsn=dsn, table="public.bench_docs",
            )  # fmt: skip
            started = time.monotonic()
            capture = threading.Thread(target=runner.run_sources, args=(rt, [source]), kwargs={"stop": stop})
            capture.start()
            service.start()
            while (c := counts(rt))[0] < args.rows or c[2] != "streaming":
                time.sleep(0.05)
            committed_s = time.monotonic() - started
            while counts(rt)[1] < args.rows:
                time.sleep(0.1)
            searchable_s = time.monotonic() - started
            figures = {
                "rows": args.rows,
                "database": database_url.split(":", 1)[0],
                "latency_ms": args.latency_ms,
                "snapshot_rows_per_s": round(args.rows / committed_s, 1),
                "snapshot_searchable_rows_per_s": round(args.rows / searchable_s, 1),
                "rate_per_s": args.rate,
                **steady_changes(dsn, rt, args),
            }
            stop.set()
            capture.join(30)
            drop_slot(source)
            return figures
    finally:
        stop.set()
        service.stop()
        rt.close()
        emulator.stop()


def render(f: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"capture of one PostgreSQL table, {f['rows']} rows; ledger on {f['database']}; "
            f"provider answers in {f['latency_ms']} ms",
            f"{'figure':<40} {'value':>12}",
            f"{'snapshot rows/s (committed)':<40} {f['snapshot_rows_per_s']:>12}",
            f"{'snapshot rows/s (searchable)':<40} {f['snapshot_searchable_rows_per_s']:>12}",
            f"{'steady changes/s':<40} {f['rate_per_s']:>12}",
            f"{'changes measured / made':<40} {f['measured']:>6} / {f['changes']:<5}",
            f"{'change -> committed p50 / p99 s':<40} {f['accepted_p50_s']:>6} / {f['accepted_p99_s']:<6}",
            f"{'change -> searchable p50 s':<40} {f['p50_s']:>12}",
            f"{'change -> searchable p99 s':<40} {f['p99_s']:>12}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000, help="rows in the table (default 20000)")
    parser.add_argument("--rate", type=float, default=50.0, help="steady changes per second (default 50)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the steady changes run")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the emulator's answer time")
    parser.add_argument(
        "--dsn", help="a database on a cluster with wal_level=logical (default: a throwaway one)"
    )
    parser.add_argument("--database-url", help="the sidecar's database (default: SQLite in a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        figures = bench(args, Path(tmp))
    print(render(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
