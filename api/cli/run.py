"""`sidecar worker`, `sidecar api` and `sidecar migrate`: the long-running processes and the schema."""

from __future__ import annotations

import argparse

from api.cli.context import open_engine
from worker.errors import ConfigError
from worker.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_worker_parser(sub)
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
    open_engine(settings).dispose()
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
    engine = open_engine(settings, check=False)
    print(f"schema at revision {schema.current_revision(engine) or 'base'}")
    engine.dispose()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_level="info")
    return 0
