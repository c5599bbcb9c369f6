"""`sidecar`: the command line. Each subcommand has --help; errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.errors import ConfigError, SchemaOutdated
from worker.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SchemaOutdated) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from api import emulator
    from api.cli import demo, spend

    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Keep a Qdrant vector store in sync with your application's text, embedding with "
        "DashScope and recording every provider request in a SQL spend ledger. Settings come from "
        "SIDECAR_* environment variables (and .env); see README.md.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "worker",
        help="run the Celery worker: ingest events and embed pending work",
        description="Consume sidecar.ingest / sidecar.ingest_many from the broker, record "
        "desired state in SQL, and embed, upsert and ledger pending documents.",
    )
    p.add_argument(
        "--pool",
        choices=("threads", "prefork", "solo"),
        default="threads",
        help="Celery pool; local-mode Qdrant (no SIDECAR_QDRANT_URL) needs threads or solo "
        "(default: threads)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="ingest task slots (default: SIDECAR_WORKER_CONCURRENCY, 4)",
    )
    p.add_argument(
        "--embed-threads",
        type=int,
        default=2,
        help="embedding loops per process; each claims its own batches (default: 2)",
    )
    p.add_argument("--loglevel", default=None, help="log level (default: SIDECAR_LOG_LEVEL, INFO)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "migrate",
        help="upgrade the SQL schema to the current revision",
        description="Run Alembic migrations on SIDECAR_DATABASE_URL (SQLite file in the "
        "data dir by default).",
    )
    p.add_argument("--revision", default="head", help="target revision for upgrade (default: head)")
    p.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "status",
        help="documents by status, requests by outcome, backlog age",
        description="Counts of documents (pending, indexed, deleted, rejected, dead) and "
        "provider requests, read from SQL.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "deadletters",
        help="list dead letters or send them back for another try",
        description="Documents that gave up (status dead): the provider refused their "
        "text, or their work never finished after SIDECAR_MAX_ATTEMPTS tries.",
    )
    dl = p.add_subparsers(title="actions", metavar="ACTION")
    q = dl.add_parser(
        "list",
        help="list dead letters with their reasons",
        description="List dead letters: id, collection, doc_id, version, attempts, reason.",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    q.set_defaults(func=cmd_deadletters_list)
    q = dl.add_parser(
        "retry",
        help="send one dead letter (ID) or all (--all) back to pending",
        description="Send dead letters back to pending with their attempts reset; the "
        "worker picks them up again.",
    )
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the dead letter's id (from `list`)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    q.set_defaults(func=cmd_deadletters_retry)
    p.set_defaults(func=lambda args, parser=p: (parser.print_help(), 2)[1])

    p = sub.add_parser(
        "reconcile",
        help="repair drift between SQL and Qdrant once, then exit",
        description="What the worker does periodically: close ledger rows abandoned "
        "mid-call as unknown (with their estimate), re-drive indexed documents whose "
        "points are missing or wrong, delete points of deleted or unknown documents. "
        "With local-mode Qdrant, stop the worker first (one process per path).",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("api", help="serve the HTTP API", description="Serve the HTTP API with uvicorn.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.set_defaults(func=cmd_api)

    emulator.add_parser(sub)
    demo.add_parser(sub)
    spend.add_parsers(sub)
    return parser


def _engine(settings: Settings, *, check: bool = True) -> Any:
    from worker.sql import engines, schema

    engine = engines.make_engine(settings.resolved_database_url())
    if check:
        schema.check_schema(engine)
    return engine


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import logs

    settings = Settings()
    logs.configure(args.loglevel or settings.log_level)
    settings.model_spec()
    if settings.dashscope_api_key is None:
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set; set it (and SIDECAR_DASHSCOPE_URL for the emulator), "
            "or run `sidecar demo`, which starts the emulator"
        )
    if settings.qdrant_url is None and args.pool == "prefork":
        raise ConfigError(
            "--pool prefork needs a Qdrant server (SIDECAR_QDRANT_URL): local mode "
            "(SIDECAR_QDRANT_PATH) can be opened by one process only"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _engine(settings).dispose()
    return run_worker(
        settings,
        pool=args.pool,
        concurrency=args.concurrency or settings.worker_concurrency,
        embed_threads=args.embed_threads,
        loglevel=args.loglevel or settings.log_level,
    )


def run_worker(settings: Settings, *, pool: str, concurrency: int, embed_threads: int, loglevel: str) -> int:
    from celery import signals

    from worker import tasks

    app = tasks.create_celery(settings)
    start = lambda **_: tasks.start_embedding(embed_threads)  # noqa: E731
    if pool == "prefork":
        signals.worker_process_init.connect(start, weak=False)
    else:
        signals.worker_ready.connect(start, weak=False)
    app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            "--hostname=sidecar@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from worker.sql import schema

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if args.downgrade:
        schema.downgrade(url, args.downgrade)
    else:
        schema.upgrade(url, args.revision)
    engine = _engine(settings, check=False)
    print(f"schema at revision {schema.current_revision(engine) or 'base'}")
    engine.dispose()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.ledger import reports

    settings = Settings()
    print(render_status(reports_of(lambda session: reports.status(session, settings)), as_json=args.json))
    return 0


def reports_of(report: Any) -> dict[str, Any]:
    from sqlalchemy.orm import Session

    engine = _engine(Settings())
    try:
        with Session(engine) as session:
            return report(session)
    finally:
        engine.dispose()


def render_status(data: dict[str, Any], *, as_json: bool) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    docs, reqs = data["documents"], data["requests"]
    lines = ["documents"] + [f"  {k:<10}{v:>10}" for k, v in docs.items()]
    lines += ["requests"] + [f"  {k:<10}{v:>10}" for k, v in reqs.items()]
    age = data["oldest_pending_age_s"]
    lines.append(f"oldest pending: {'-' if age is None else f'{age:.1f}s'}")
    for key, value in data.items():  # anything else the report carries (pauses, budgets)
        if key not in ("documents", "requests", "oldest_pending_age_s"):
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def cmd_deadletters_list(args: argparse.Namespace) -> int:
    from worker.sql import deadletters

    rows = reports_of(lambda session: deadletters.list_dead(session, limit=args.limit))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no dead letters")
        return 0
    print(f"{'id':>8}  {'collection':<16}{'doc_id':<28}{'version':>10}{'attempts':>9}  reason")
    for r in rows:
        reason = " ".join((r["last_error"] or "").split())[:80]
        print(
            f"{r['id']:>8}  {r['collection']:<16}{r['doc_id'][:27]:<28}{r['version']:>10}"
            f"{r['attempts']:>9}  {reason}"
        )
    return 0


def cmd_deadletters_retry(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from worker.sql import deadletters

    engine = _engine(Settings())
    try:
        with Session(engine) as session, session.begin():
            count = deadletters.retry_dead(session, None if args.all else args.id)
    finally:
        engine.dispose()
    if not count and not args.all:
        print(f"sidecar: no dead letter with id {args.id}", file=sys.stderr)
        return 1
    print(f"{count} dead letter(s) sent back to pending")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from worker import logs, reconciler
    from worker.runtime import build_runtime

    settings = Settings()
    logs.configure(settings.log_level)
    _engine(settings).dispose()
    rt = build_runtime(settings, embedder=NoProvider(settings))  # repairs call no provider
    try:
        report = reconciler.reconcile(rt)
    finally:
        rt.close()
    print(
        f"abandoned ledger rows closed: {report.abandoned_requests}; documents re-driven: "
        f"{report.redriven}; points removed: {report.removed}"
    )
    return 0


class NoProvider:
    """An Embedder stand-in for commands that never embed (no API key needed)."""

    api = "none"

    def __init__(self, settings: Settings) -> None:
        self.model, self.dimensions = settings.embedding_model, settings.embedding_dimensions

    def embed(self, texts: list[str], **_: Any) -> Any:
        raise ConfigError("this command does not call the provider")

    def close(self) -> None:
        pass


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_level="info")
    return 0
