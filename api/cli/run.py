"""`sidecar worker`, `sidecar api`, `sidecar serve` (both in one process, api/serve.py) and
`sidecar migrate`: the long-running processes and the schema."""

from __future__ import annotations

import argparse

from api.cli.context import open_engine
from worker.errors import ConfigError
from worker.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_worker_parser(sub)
    add_serve_parser(sub)
    p = sub.add_parser("api", help="serve the HTTP API", description="Serve the HTTP API with uvicorn.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "migrate",
        help="upgrade the SQL schema to the current revision",
        description="Run Alembic migrations on SIDECAR_DATABASE_URL (SQLite file in the "
        "data dir by default).",
    )
    p.add_argument("--revision", default="head", help="target revision for upgrade (default: head)")
    p.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)


def add_worker_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="Celery pool; the embedded stores (no SIDECAR_QDRANT_URL) serve one process, so they "
        "need threads or solo (default: threads)",
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
        default=None,
        help="embedding loops per process at most, each claiming its own work; one works while the "
        "process keeps up, more join under a backlog (default: 6)",
    )
    p.add_argument("--loglevel", default=None, help="log level (default: SIDECAR_LOG_LEVEL, INFO)")
    p.set_defaults(func=cmd_worker)


SERVE_DESCRIPTION = """\
Run the worker (Celery consumer of sidecar.ingest / sidecar.ingest_many on a threads pool, as
`sidecar worker --pool threads`), its embedding threads and the HTTP API (as `sidecar api`) in
ONE process sharing one runtime: the embedded store (no SIDECAR_QDRANT_URL) can be opened by one
process only, so this is how the API serves beside the worker on the embedded defaults.

With --emulator, or when DASHSCOPE_API_KEY is not set, the bundled DashScope emulator also runs
in the process on a free loopback port and the worker embeds through it (nothing is billed; the
first line says the provider is emulated).

Start: the schema is upgraded first with --migrate (the default on the embedded SQLite database,
i.e. when SIDECAR_DATABASE_URL is unset), else checked: an outdated schema refuses to start (run
`sidecar migrate`). One line per part shows its address (provider, database, store, embedding,
worker with its broker, api). Without SIDECAR_BROKER_URL the broker is the SQLite file in
SIDECAR_DATA_DIR, and without SIDECAR_QDRANT_URL the store is embedded there too. The API's
bearer tokens come from SIDECAR_API_TOKENS (read and write) and SIDECAR_API_READ_TOKENS; with
neither set every call but the probes answers 401.

Stop: SIGINT (Ctrl-C) or SIGTERM stops accepting HTTP, shuts the consumer down warm (running
ingest tasks finish and are acknowledged; messages not started go back to the broker), stops the
embedding threads, closes the store and exits 0. A second signal exits at once.
"""


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="worker + HTTP API (+ emulator) in one process",
        description=SERVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--emulator",
        action="store_true",
        help="embed through the bundled DashScope emulator even when DASHSCOPE_API_KEY is set",
    )
    p.add_argument("--host", default="127.0.0.1", help="API bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    p.add_argument(
        "--embed-threads",
        type=int,
        default=None,
        help="embedding loops in the process at most; more than one work only under a backlog (default: 6)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="ingest task slots (default: SIDECAR_WORKER_CONCURRENCY, 4)",
    )
    p.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="upgrade the schema before starting (default: only on the embedded SQLite database; "
        "--no-migrate only checks it)",
    )
    p.add_argument("--loglevel", default=None, help="log level (default: SIDECAR_LOG_LEVEL, INFO)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from api import serve
    from worker import logs

    settings = _settings(args)
    loglevel = args.loglevel or settings.log_level
    logs.configure(loglevel, task_lines=settings.log_task_lines)
    settings.model_spec()
    options = serve.ServeOptions(
        host=args.host,
        port=args.port,
        embed_threads=args.embed_threads or settings.default_embed_threads(),
        concurrency=settings.worker_concurrency,
        loglevel=loglevel,
        emulator=args.emulator,
        migrate=args.migrate,
    )
    return serve.run(settings, options)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, with `--concurrency` (the consumer's threads, and so the ingest groups'
    size: worker/groupcommit.py) in place of SIDECAR_WORKER_CONCURRENCY when given."""
    settings = Settings()
    if args.concurrency:
        settings = settings.model_copy(update={"worker_concurrency": args.concurrency})
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import logs

    settings = _settings(args)
    logs.configure(args.loglevel or settings.log_level, task_lines=settings.log_task_lines)
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
    open_engine(settings).dispose()
    return run_worker(
        settings,
        pool=args.pool,
        embed_threads=args.embed_threads or settings.default_embed_threads(),
        loglevel=args.loglevel or settings.log_level,
    )


def run_worker(settings: Settings, *, pool: str, embed_threads: int, loglevel: str) -> int:
    from celery import signals

    from worker import tasks

    # Ingest messages gather in groups of the pool's threads; a prefork child or the solo pool
    # runs one task at a time, so nothing would ever join (worker/groupcommit.py).
    if pool != "threads":
        settings = settings.model_copy(update={"ingest_gather_s": 0.0})
    app = tasks.create_celery(settings)

    def start(**_: object) -> None:
        tasks.start_embedding(embed_threads)

    if pool == "prefork":
        signals.worker_process_init.connect(start, weak=False)
    else:
        signals.worker_ready.connect(start, weak=False)
    app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={settings.worker_concurrency}",
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
    engine = open_engine(settings, check=False)
    print(f"schema at revision {schema.current_revision(engine) or 'base'}")
    engine.dispose()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    # No access log: its lines carry the query string, and so a search's text (/v1/search?q=…).
    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
