"""`sidecar demo`: the whole pipeline on embedded defaults, end to end, with a summary.

No Redis, PostgreSQL, Qdrant server or API key needed: the broker is an SQLite file, state and
ledger another, vectors live in qdrant-client's local mode, and without DASHSCOPE_API_KEY the
bundled emulator stands in for the provider. The worker is the real one, in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from api.emulator import EmulatorConfig, start_in_thread
from worker.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from api.emulator import RunningEmulator
    from worker.embedding.base import Embedder

EMBEDDED = (
    "SIDECAR_BROKER_URL",
    "SIDECAR_DATABASE_URL",
    "SIDECAR_QDRANT_URL",
    "SIDECAR_QDRANT_PATH",
    "SIDECAR_EDGE_PATH",
    "SIDECAR_REDIS_URL",
    "SIDECAR_COLLECTION_PREFIX",
)
DEFAULT_QUERY = "How long does shipping take?"
EMULATOR_KEY = "sk-emulator"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="ingest a bundled sample set end to end on embedded defaults and print a summary",
        description="Start the real worker on embedded defaults (SQLite broker and database, local-mode "
        "Qdrant) in <SIDECAR_DATA_DIR>/demo, publish a bundled sample set (about 300 documents in "
        "several languages, with updates, deletes and a few malformed events) through Celery, show "
        "progress until the backlog is drained, and print documents, points, requests, tokens, cost "
        "and a sample search. Without DASHSCOPE_API_KEY it starts the bundled DashScope emulator; "
        "with it, the real provider is used (and billed).",
    )
    parser.add_argument("--events", type=Path, help="JSONL file of events (default: the bundled sample)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the demo keeps its files (default: <SIDECAR_DATA_DIR>/demo; wiped at start)",
    )
    parser.add_argument("--query", default=DEFAULT_QUERY, help=f"sample search (default: {DEFAULT_QUERY!r})")
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="give up after this long (default 900)"
    )
    parser.set_defaults(func=run)
    return parser


# Two events that break the contract, sent along with the sample: they are recorded as rejected
# with their reasons (see `sidecar status`) and everything else flows on.
MALFORMED = [
    {"op": "upsert", "doc_id": "demo-missing-text", "collection": "demo"},
    {"op": "rename", "doc_id": "demo-bad-op", "collection": "demo", "text": "?"},
]


def load_events(path: Path | None) -> list[Any]:
    if path is None:
        text = resources.files("worker").joinpath("data/sample_events.jsonl").read_text("utf-8")
        extra: list[Any] = list(MALFORMED)
    else:
        text = path.read_text("utf-8")
        extra = []
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"_unparsable_line": number})  # the worker records it as rejected
    return events + extra


def expected_state(events: list[Any], default_collection: str) -> dict[tuple[str, str], int]:
    """The version each valid document must end at (the highest one sent)."""
    latest: dict[tuple[str, str], int] = {}
    for event in events:
        if (
            isinstance(event, dict)
            and isinstance(event.get("doc_id"), str)
            and isinstance(event.get("version"), int)
            and event.get("op") in ("upsert", "delete")
        ):
            key = (event.get("collection") or default_collection, event["doc_id"])
            latest[key] = max(latest.get(key, -1), event["version"])
    return latest


def run(args: argparse.Namespace) -> int:
    from worker.sql import schema

    base = Settings()
    data_dir = (args.data_dir or base.data_dir / "demo").resolve()
    events = load_events(args.events)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    emulator = None
    if base.dashscope_api_key is None:
        emulator = start_in_thread(EmulatorConfig())
        print(f"provider : DashScope emulator at {emulator.url} (no DASHSCOPE_API_KEY set)")
    else:
        print(f"provider : DashScope at {base.provider_root()} (DASHSCOPE_API_KEY is set: this is billed)")
    try:
        settings = embedded_settings(base, data_dir, emulator)
        print(f"data dir : {data_dir}  (SQLite broker and database, local-mode Qdrant)")
        print(
            f"model    : {settings.embedding_model} / {settings.embedding_dimensions} dims, "
            f"{settings.embedding_api} API"
        )
        schema.upgrade(settings.resolved_database_url())
        log_path = data_dir / "worker.log"
        worker = start_worker(worker_env(settings, emulator), log_path)
        try:
            return _run_demo(args, settings, events, worker, log_path, emulator)
        finally:
            stop(worker)
    finally:
        if emulator is not None:
            emulator.stop()


def embedded_settings(base: Settings, data_dir: Path, emulator: RunningEmulator | None) -> Settings:
    """`base` on the embedded defaults in `data_dir`, and on the emulator when one runs."""
    embedded: dict[str, Any] = {
        "data_dir": data_dir,
        "broker_url": None,
        "redis_url": None,
        "database_url": None,
        "qdrant_url": None,
        "qdrant_path": None,  # not local mode: the embedded default, Qdrant Edge in data_dir/edge
        "edge_path": None,
        "collection_prefix": "",
    }
    if emulator is not None:
        embedded |= {"dashscope_api_key": SecretStr(EMULATOR_KEY), "dashscope_url": emulator.url}
    return base.model_copy(update=embedded)


def worker_env(settings: Settings, emulator: RunningEmulator | None) -> dict[str, str]:
    """This process's environment without the EMBEDDED variables, pointing the worker at the demo's
    data dir (and its broker and database, which a `.env` file cannot then move elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED}
    env["SIDECAR_DATA_DIR"] = str(settings.data_dir)
    env["SIDECAR_BROKER_URL"] = settings.resolved_broker_url()
    env["SIDECAR_DATABASE_URL"] = settings.resolved_database_url()
    if emulator is not None:
        env["DASHSCOPE_API_KEY"] = EMULATOR_KEY
        env["SIDECAR_DASHSCOPE_URL"] = emulator.url
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The real worker (`sidecar worker`) in its own process, its output in `log_path`."""
    command = ["worker", "--pool", "threads", "--embed-threads", "1", "--loglevel", "WARNING"]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", *command], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


def _run_demo(
    args: argparse.Namespace,
    settings: Settings,
    events: list[Any],
    worker: subprocess.Popen[bytes],
    log_path: Path,
    emulator: RunningEmulator | None,
) -> int:
    started = time.monotonic()
    publish(settings, events)
    print(f"published: {len(events)} events through Celery (sidecar.ingest_many)")
    expected = expected_state(events, settings.default_collection)
    if not wait_drained(settings, expected, worker, started, args.timeout_s):
        print(f"demo: not drained within {args.timeout_s:.0f}s; see {log_path}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    stop(worker)  # the summary opens the local-mode Qdrant path the worker held
    collection = (
        Counter(c for c, _ in expected).most_common(1)[0][0] if expected else settings.default_collection
    )
    print(summary(settings, collection, elapsed, args.query, emulator))
    return 0


def search_embedding(engine: Engine, settings: Settings, embedder: Embedder, query: str) -> list[float]:
    """Embed the sample query as a `query` text, ledgered like every provider call."""
    import uuid

    from sqlalchemy.orm import Session

    from worker import tokens
    from worker.ledger import calls

    request_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        calls.open_request(
            session,
            request_id=request_id,
            model=embedder.model,
            dimensions=embedder.dimensions,
            api=embedder.api,
            rows=1,
            est_tokens=tokens.count_tokens(query),
            items=[],
            attempt=1,
            key_fingerprint=settings.key_fingerprint(),
            worker="demo-search",
        )
    result = embedder.embed([query], text_type="query")
    with Session(engine) as session, session.begin():
        calls.record_success(
            session, request_id, result, settings.model_spec().cost_nano_cny(result.billed_tokens)
        )
    return result.vectors[0]


def publish(settings: Settings, events: list[Any], per_message: int = 25) -> None:
    from worker.tasks import create_celery

    app = create_celery(settings)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(events), per_message):
            app.send_task(
                "sidecar.ingest_many", args=[events[start : start + per_message]], producer=producer
            )


def wait_drained(
    settings: Settings,
    expected: dict[tuple[str, str], int],
    worker: subprocess.Popen[bytes],
    started: float,
    timeout_s: float,
) -> bool:
    import sqlalchemy as sa

    from worker.ledger import reports
    from worker.sql import engines, models

    engine = engines.make_engine(settings.resolved_database_url())
    tty = sys.stdout.isatty()
    last_print = 0.0
    try:
        while time.monotonic() - started < timeout_s:
            if worker.poll() is not None:
                print(f"\ndemo: the worker exited with code {worker.returncode}", file=sys.stderr)
                return False
            with engines.make_sessionmaker(engine)() as session:
                st = reports.status(session, settings)
                rows = session.execute(
                    sa.select(
                        models.Document.collection,
                        models.Document.doc_id,
                        models.Document.version,
                        models.Document.status,
                    )
                ).all()
                tokens = session.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(models.ProviderRequest.billed_tokens), 0))
                ).scalar_one()
            done = {(c, d) for c, d, v, s in rows if s != "pending" and v == expected.get((c, d))}
            docs = st["documents"]
            line = (
                f"progress : {len(done)}/{len(expected)} documents settled · indexed {docs['indexed']} · "
                f"deleted {docs['deleted']} · pending {docs['pending']} · rejected {docs['rejected']} · "
                f"requests {st['requests']['succeeded']} · tokens {tokens}"
            )
            now = time.monotonic()
            if tty:
                print("\r" + line, end="", flush=True)
            elif now - last_print >= 2.0:
                print(line, flush=True)
                last_print = now
            if len(done) == len(expected):
                print("\r" + line if tty else line)
                return True
            time.sleep(0.3)
        return False
    finally:
        engine.dispose()


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def summary(
    settings: Settings, collection: str, elapsed_s: float, query: str, emulator: RunningEmulator | None
) -> str:
    from sqlalchemy.orm import Session

    from worker.ledger import reports
    from worker.runtime import build_embedder, build_store
    from worker.sql import engines

    engine = engines.make_engine(settings.resolved_database_url())
    store = build_store(settings)
    embedder = build_embedder(settings)
    try:
        points = store.count(collection)
        hits = store.search(collection, search_embedding(engine, settings, embedder, query), limit=3)
    finally:
        embedder.close()
        store.close()
    with Session(engine) as session:
        st = reports.status(session, settings)
        spend = reports.spend(session)["total"]
    engine.dispose()
    bill = emulator.bill() if emulator is not None else None
    docs = st["documents"]
    ok = spend["requests"] - spend["failed"]
    lines = [
        "",
        f"documents: {docs['indexed']} indexed, {docs['deleted']} deleted, {docs['rejected']} events "
        f"rejected, {docs['dead']} dead letters, {docs['pending']} pending",
        f"points   : {points} in collection {collection!r}",
        f"requests : {spend['requests']} ({spend['failed']} failed), "
        f"{spend['rows'] / ok if ok else 0:.2f} rows per request",
        f"tokens   : {spend['tokens']} billed (the sample search included)",
        f"cost     : CNY {spend['cost_cny']} at the real-time price",
        f"time     : {elapsed_s:.1f}s from first publish to drained",
    ]
    if bill is not None:
        match = "matches the ledger" if bill["total_tokens"] == spend["tokens"] else "DIFFERS from the ledger"
        lines.append(
            f"bill     : the emulator charged {bill['total_tokens']} tokens in "
            f"{len(bill['requests'])} requests; {match}"
        )
    lines.append(f"search   : {query!r}")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join((hit.text or "").split())[:70]
        lines.append(f"  {rank}. {hit.score:.3f}  {hit.doc_id} #{hit.chunk_index}  {snippet}")
    return "\n".join(lines)
