"""Throughput against the provider's rate limits, on real processes and services.

    python -m bench.throughput --events 2000                       # quick: about 2 minutes
    python -m bench.throughput --rpm 600 --tpm 300000 --latency-ms 50 --workers 3 --events 10000
    python -m bench.throughput --overhead --events 5000            # pipeline vs a bare Celery task
    python -m bench.throughput --overhead --events 5000 --events-per-message 1
    python -m bench.throughput --overhead --events 5000 --embedded # SQLite broker and database
    python -m bench.throughput --latency --events 60               # 2 events/s, one per message
    python -m bench.throughput --rpm 6000 --tpm 24000000 --latency-ms 50 --workers 2 \
        --model text-embedding-v3 --region singapore --short-texts --naive-s 0 --events 20000

Limits mode: the emulator (its own process) enforces --rpm/--tpm with --latency-ms per answer;
--workers `sidecar worker` processes consume from Redis (db 12, flushed) with PostgreSQL (a fresh
database per run) for state and ledger, SIDECAR_REDIS_URL on Redis db 11 for the shared limiter,
and each its own local Qdrant path (standing in for hosts sharing one Qdrant server; so the
periodic reconciler, which would take the other paths' documents for drift, is off). Events of
mixed sizes are published as fast as Celery takes them. Then the naive baseline runs on the same
emulator (reset) and a fresh database: one document per claim (one row per request), a
per-process limiter set to the full limits, retries on 429; it runs for --naive-s at most.

Overhead mode: the emulator without limits or latency; end-to-end events/s next to the rate of a
bare Celery no-op task (one INCR on Redis) on the same broker, pool and worker count; and the SQL
commits per event (PostgreSQL's `pg_stat_database.xact_commit` over the run, the bench's own
polling subtracted). `--events-per-message` sets how many events each message carries (50 by
default; 1 is the most common case in production).

Latency mode: one event per message at `--rate` events/s (2 by default), emulator without
limits; publish → indexed (the point's `embedded_at` in Qdrant) percentiles.

`--embedded` runs any mode on the embedded default instead: the SQLite broker and an SQLite
database (one worker process, as the embedded default runs); the vector store stays a local
Qdrant path in both, so the two differ by broker and database only.

The figures' definitions are printed under the table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    EmulatorProcess,
    clean_env,
    exclusive,
    flush_redis,
    max_window,
    percentile,
    proc_usage,
    rate_per_min,
    redis_db_url,
    start_process,
    stop_process,
    tail,
    temp_database,
    wait_for,
)

COLLECTION = "bench"
MODEL = "text-embedding-v4"
PUBLISH_BATCH = 50  # events per sidecar.ingest_many message
NOOP_TASK = "bench.noop"
NOOP_DONE_KEY = "bench:noop:done"
NOOP_READY_KEY = "bench:noop:ready"
UNLIMITED_RPM = 10_000_000  # the workers' limiter in overhead mode: never the bottleneck
UNLIMITED_TPM = 10_000_000_000

# --- events ---------------------------------------------------------------------------------

# (share, min words, max words): mostly short texts (titles, messages), some paragraphs, a few
# longer notes. About 38 tokens per event on average, so at 600 rpm × 10 rows and 300k tpm the
# request limit binds (6,000 rows/min) with the token limit three quarters used.
SIZE_MIX = ((0.65, 6, 28), (0.28, 28, 78), (0.07, 78, 190))
SHORT_MIX = ((1.0, 6, 28),)  # --short-texts: titles and messages only (about 16 tokens)
WORDS = (
    "order shipping return refund invoice customer account password delivery warehouse parcel "
    "tracking address payment card discount coupon subscription renewal cancel upgrade support ticket "
    "agent reply question answer product size colour stock price tax receipt weekend morning evening "
    "coffee kettle lamp backpack speaker battery charger cable screen keyboard garden kitchen recipe "
    "lentil soup bread oven minutes salt pepper lemon garlic onion tomato travel train station ticket "
    "museum river bridge harbour market street hotel breakfast map search vector index cluster "
    "latency memory storage backup restore deploy release version report meeting budget quarter "
    "growth team project deadline review draft summary note "
).split()


@dataclass(frozen=True)
class BenchEvent:
    doc_id: str
    text: str
    tokens: int  # as the provider (and the emulator) counts them


def make_events(count: int, *, seed: int = 7, prefix: str = "doc", short: bool = False) -> list[BenchEvent]:
    """`count` deterministic events of mixed sizes (or short ones), each text unique (no cache hits)."""
    from worker.tokens import count_tokens

    rng = random.Random(seed)
    mix = SHORT_MIX if short else SIZE_MIX
    shares = [share for share, _, _ in mix]
    events = []
    for i in range(count):
        _, low, high = rng.choices(mix, weights=shares)[0]
        words = rng.choices(WORDS, k=rng.randint(low, high))
        text = f"{prefix} {i}: " + " ".join(words) + "."
        events.append(BenchEvent(f"{prefix}-{i}", text, count_tokens(text)))
    return events


def as_message(event: BenchEvent) -> dict[str, Any]:
    return {
        "op": "upsert",
        "doc_id": event.doc_id,
        "collection": COLLECTION,
        "version": 1,
        "text": event.text,
    }


def publish(
    broker_url: str, events: list[BenchEvent], *, per_message: int = PUBLISH_BATCH, rate: float | None = None
) -> dict[str, float]:
    """Send every event through Celery, `per_message` to a message (`sidecar.ingest` for one,
    `sidecar.ingest_many` for more), as fast as Celery takes them or at `rate` messages/s;
    returns the unix time each doc's message was sent."""
    from worker.settings import Settings
    from worker.tasks import create_celery

    app = create_celery(Settings(_env_file=None, broker_url=broker_url))
    published: dict[str, float] = {}
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for n, start in enumerate(range(0, len(events), per_message)):
            if rate is not None:
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
            batch = events[start : start + per_message]
            if per_message == 1:
                app.send_task("sidecar.ingest", args=[as_message(batch[0])], producer=producer)
            else:
                app.send_task("sidecar.ingest_many", args=[[as_message(e) for e in batch]], producer=producer)
            sent_at = time.time()
            published.update((e.doc_id, sent_at) for e in batch)
    return published


# --- one run of the pipeline ----------------------------------------------------------------


@dataclass
class Services:
    postgres_url: str  # an admin URL on the server; each run creates its own database
    broker_url: str
    limiter_url: str
    emulator: EmulatorProcess
    workdir: Path
    embedded: bool = False  # SQLite broker and database (the embedded default) instead
    model: str = MODEL
    region: str = "beijing"
    store: str = "local"  # each worker's own store: qdrant-client local mode, or Qdrant Edge

    def run_broker(self, name: str) -> str:
        """A fresh broker for one run: the Redis db flushed, or a new SQLite broker file."""
        if self.embedded:
            return f"sqla+sqlite:///{self.workdir / f'{name}-broker.sqlite'}"
        flush_redis(self.broker_url)
        return self.broker_url

    @contextmanager
    def run_database(self, name: str) -> Iterator[str]:
        """A fresh database for one run: PostgreSQL (created, then dropped) or an SQLite file."""
        if self.embedded:
            yield f"sqlite:///{self.workdir / f'{name}-sidecar.sqlite'}"
            return
        with temp_database(self.postgres_url, prefix=f"bench_{name}") as url:
            yield url


@dataclass
class RunResult:
    events: int
    drained: bool
    indexed: int
    dead: int
    published_at: float  # first publish, unix time
    finished_at: float  # drained or cut off, unix time
    log: list[dict[str, Any]]  # the emulator's log of this run
    ledger: dict[str, int]
    searchable_at: dict[str, float]  # doc_id -> embedded_at (unix time) found in Qdrant
    publish_times: dict[str, float]
    worker_cpu_s: float  # from workers ready to just before stopping
    startup_cpu_s: float
    peak_rss_mb: float
    limiter_keys: int  # keys the workers left in the shared limiter's Redis db
    cutoff: float | None = None  # unix time the run was cut at (naive baseline)
    commits: int | None = None  # PostgreSQL transactions committed from workers ready to drained
    extra: dict[str, Any] = field(default_factory=dict)


def worker_env(
    svc: Services,
    broker_url: str,
    database_url: str,
    index: int,
    *,
    rpm: int,
    tpm: int,
    shared_limiter: bool,
    **settings: str,
) -> dict[str, str]:
    home = svc.workdir / f"worker-{index}"
    home.mkdir(parents=True, exist_ok=True)
    return clean_env(
        SIDECAR_DATA_DIR=str(home),
        SIDECAR_QDRANT_PATH=str(home / "qdrant"),
        SIDECAR_BROKER_URL=broker_url,
        SIDECAR_DATABASE_URL=database_url,
        SIDECAR_REDIS_URL=svc.limiter_url if shared_limiter else None,
        DASHSCOPE_API_KEY="sk-emulator",
        SIDECAR_DASHSCOPE_URL=svc.emulator.url,
        SIDECAR_EMBEDDING_MODEL=svc.model,
        SIDECAR_REGION=svc.region,
        SIDECAR_REQUESTS_PER_MINUTE=str(rpm),
        SIDECAR_TOKENS_PER_MINUTE=str(tpm),
        # The reconciler compares SQL with *its* Qdrant; with one local path per worker it would
        # take every document another worker wrote for drift and re-drive it.
        SIDECAR_RECONCILE_INTERVAL_S="0",
        **settings,
    )


def run_pipeline(
    svc: Services,
    events: list[BenchEvent],
    *,
    name: str,
    workers: int,
    embed_threads: int,
    rpm: int,
    tpm: int,
    shared_limiter: bool,
    timeout_s: float,
    run_for_s: float | None = None,
    settings: dict[str, str] | None = None,
    per_message: int = PUBLISH_BATCH,
    rate: float | None = None,
) -> RunResult:
    """Workers up, events published, wait until every doc is indexed (or `run_for_s` passed),
    workers stopped; then the emulator's log, the ledger and each worker's Qdrant are read."""
    import sqlalchemy as sa

    svc.emulator.reset()
    broker_url = svc.run_broker(name)
    flush_redis(svc.limiter_url)
    with svc.run_database(name) as database_url:
        env_of = lambda i, **extra: worker_env(  # noqa: E731
            svc, broker_url, database_url, i, rpm=rpm, tpm=tpm, shared_limiter=shared_limiter, **extra
        )
        migrate = start_process(["-m", "api.cli", "migrate"], env_of(0), svc.workdir / f"{name}-migrate.log")
        if migrate.wait() != 0:
            raise RuntimeError(f"sidecar migrate failed:\n{tail(svc.workdir / f'{name}-migrate.log')}")

        procs = []
        for i in range(workers):
            env = env_of(i, **(settings or {}))
            store_path = str(svc.workdir / f"{name}-qdrant-{i}")
            env["SIDECAR_QDRANT_PATH" if svc.store == "local" else "SIDECAR_EDGE_PATH"] = store_path
            if svc.store == "edge":
                env.pop("SIDECAR_QDRANT_PATH", None)
            log_path = svc.workdir / f"{name}-worker-{i}.log"
            argv = ["-m", "api.cli", "worker", "--pool", "threads", "--embed-threads", str(embed_threads)]
            procs.append((start_process([*argv, "--loglevel", "INFO"], env, log_path), log_path))
        engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        commits = CommitCounter(engine)
        try:
            wait_for(
                lambda: all("embed.started" in tail(p, 10**7) for _, p in procs),
                timeout_s=60,
                what=f"{workers} workers ready",
                procs=procs,
                interval_s=0.2,
            )
            ready = [proc_usage(proc.pid) for proc, _ in procs]
            commits.start()

            started = time.time()
            publish_times = publish(broker_url, events, per_message=per_message, rate=rate)
            progress = Progress(name, len(events), started)

            def settled() -> dict[str, int] | None:
                with engine.connect() as conn:
                    counts = dict(
                        conn.execute(sa.text("select status, count(*) from documents group by status")).all()
                    )
                    conn.commit()
                commits.own += 1
                progress.show(counts)
                done = counts.get("indexed", 0) + counts.get("dead", 0) >= len(events)
                over = run_for_s is not None and time.time() - started >= run_for_s
                return counts if done or over else None

            counts = wait_for(
                settled,
                timeout_s=timeout_s,
                what=f"{len(events)} documents indexed",
                procs=procs,
                interval_s=0.25 if rate is None else 0.05,
            )
            finished = time.time()
            progress.close()
            drained = counts.get("indexed", 0) + counts.get("dead", 0) >= len(events)
            end = [proc_usage(proc.pid) for proc, _ in procs]
            committed = commits.stop()
        finally:
            for proc, _ in procs:  # a cut-off run has nothing left worth a graceful stop
                stop_process(proc, grace_s=30.0 if run_for_s is None else 3.0)
            engine.dispose()
        with sa.create_engine(database_url, poolclass=sa.pool.NullPool).connect() as conn:
            ledger = conn.execute(sa.text(LEDGER_SQL)).mappings().one()
    log = svc.emulator.log()
    return RunResult(
        events=len(events),
        drained=drained,
        indexed=counts.get("indexed", 0),
        dead=counts.get("dead", 0),
        published_at=started,
        finished_at=finished,
        log=log,
        ledger={k: int(v) for k, v in ledger.items()},
        searchable_at=read_searchable([svc.workdir / f"{name}-qdrant-{i}" for i in range(workers)], svc.store)
        if run_for_s is None
        else {},
        publish_times=publish_times,
        worker_cpu_s=sum(e.cpu_s - r.cpu_s for e, r in zip(end, ready, strict=True)),
        startup_cpu_s=sum(r.cpu_s for r in ready),
        peak_rss_mb=max(e.peak_rss_mb for e in end),
        limiter_keys=redis_keys(svc.limiter_url),
        cutoff=None if drained else finished,
        commits=committed,
    )


LEDGER_SQL = (
    "select count(case when status = 'succeeded' then 1 end) as succeeded, "
    "count(case when status <> 'succeeded' then 1 end) as failed, "
    "coalesce(sum(case when status = 'succeeded' then rows end), 0) as rows, "
    "coalesce(sum(billed_tokens), 0) as tokens from provider_requests"
)


class CommitCounter:
    """Transactions committed in the run's PostgreSQL database between `start` and `stop`
    (`pg_stat_database.xact_commit`), less the bench's own (`own`, and its reads of the counter).
    None on SQLite, which keeps no such counter."""

    SQL = "select xact_commit from pg_stat_database where datname = current_database()"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.own = 0
        self.first = 0

    def _read(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            conn.execute(sa.text("select pg_stat_clear_snapshot()"))
            value = int(conn.execute(sa.text(self.SQL)).scalar_one())
            conn.commit()
        return value

    def start(self) -> None:
        if self.postgres:
            time.sleep(1.1)  # backends report their counts at most once a second
            self.first = self._read()
            self.own = 0

    def stop(self) -> int | None:
        if not self.postgres:
            return None
        time.sleep(1.1)
        return self._read() - self.first - self.own - 1


class Progress:
    """One progress line on stderr every couple of seconds (stdout is for the result)."""

    def __init__(self, name: str, total: int, started: float) -> None:
        self.name, self.total, self.started, self.last = name, total, started, 0.0
        self.tty = sys.stderr.isatty()

    def show(self, counts: dict[str, int]) -> None:
        now = time.time()
        if now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        line = (
            f"{self.name:<9} {now - self.started:6.1f}s  indexed {counts.get('indexed', 0):>6}/{self.total}"
            f"  pending {counts.get('pending', 0):>6}  dead {counts.get('dead', 0)}"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def read_searchable(paths: list[Path], store: str = "local") -> dict[str, float]:
    """doc_id -> the earliest `embedded_at` of its points, over every worker's local Qdrant."""
    from qdrant_client import QdrantClient

    found: dict[str, float] = {}
    if store == "edge":
        return read_searchable_edge(paths)
    for path in paths:
        if not path.exists():
            continue
        client = QdrantClient(path=str(path))
        try:
            if not client.collection_exists(COLLECTION):
                continue
            offset = None
            while True:
                points, offset = client.scroll(
                    COLLECTION,
                    limit=2048,
                    offset=offset,
                    with_vectors=False,
                    with_payload=["doc_id", "embedded_at"],
                )
                for point in points:
                    payload = point.payload or {}
                    if "embedded_at" in payload:
                        at = dt.datetime.fromisoformat(payload["embedded_at"]).timestamp()
                        doc = payload["doc_id"]
                        found[doc] = min(at, found.get(doc, at))
                if offset is None:
                    break
        finally:
            client.close()
    return found


def read_searchable_edge(paths: list[Path]) -> dict[str, float]:
    """read_searchable over Qdrant Edge directories."""
    from worker.vectorstore.edge_reads import EdgeReads

    found: dict[str, float] = {}
    for path in paths:
        if not path.exists():
            continue
        reads = EdgeReads(path)
        try:
            for record in reads.scroll(COLLECTION):
                payload = record.payload or {}
                if "embedded_at" in payload:
                    at = dt.datetime.fromisoformat(payload["embedded_at"]).timestamp()
                    doc = payload["doc_id"]
                    found[doc] = min(at, found.get(doc, at))
        finally:
            reads.close()
    return found


def redis_keys(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


# --- figures ----------------------------------------------------------------------------------


def ceiling_rows_per_min(rpm: int, tpm: int, max_rows: int, mean_tokens_per_row: float) -> float:
    return min(rpm * max_rows, tpm / mean_tokens_per_row)


def provider_figures(run: RunResult, ceiling: float) -> dict[str, Any]:
    """What the emulator saw: accepted rows and requests, 429s, the fullest 60 s windows."""
    accepted = [e for e in run.log if e["status"] == 200]
    throttled = sum(e["status"] == 429 for e in run.log)
    achieved = rate_per_min([(e["at"], e["rows"]) for e in accepted], cutoff=run.cutoff)
    window_rpm, window_tpm = max_window([(e["at"], e["tokens"]) for e in accepted])
    span = (max(e["at"] for e in accepted) - min(e["at"] for e in accepted)) if accepted else 0.0
    return {
        "requests": len(run.log),
        "accepted_requests": len(accepted),
        "rows": sum(e["rows"] for e in accepted),
        "tokens": sum(e["tokens"] for e in accepted),
        "achieved_rows_per_min": achieved,
        "utilization": achieved / ceiling if ceiling else 0.0,
        "rate_limited_ratio": throttled / len(run.log) if run.log else 0.0,
        "rows_per_request": sum(e["rows"] for e in accepted) / len(accepted) if accepted else 0.0,
        "max_window_rpm": window_rpm,
        "max_window_tpm": window_tpm,
        "provider_span_s": span,
    }


def latency_figures(run: RunResult) -> dict[str, Any]:
    waits = [run.searchable_at[d] - t for d, t in run.publish_times.items() if d in run.searchable_at]
    return {
        "searchable_docs": len(waits),
        "latency_p50_s": percentile(waits, 50),
        "latency_p99_s": percentile(waits, 99),
        "latency_max_s": max(waits) if waits else None,
        "slowest_event": _slowest(run),
    }


def _slowest(run: RunResult) -> int | None:
    """The publish position (1 = first) of the event that took longest to become searchable."""
    order = sorted(run.publish_times, key=lambda d: run.publish_times[d])
    waits = {d: run.searchable_at[d] - run.publish_times[d] for d in order if d in run.searchable_at}
    return 1 + order.index(max(waits, key=lambda d: waits[d])) if waits else None


def rounded(values: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4) if abs(v) < 10 else round(v, 1)
        if isinstance(v, dict):
            return rounded(v)
        return v

    return {k: one(v) for k, v in values.items()}


def table(rows: list[tuple[str, Any, str]]) -> str:
    """Aligned `figure  value  target` lines."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "-" if v is None else str(v)

    cells = [(name, fmt(value), target) for name, value, target in rows]
    w0 = max(len(c[0]) for c in cells)
    w1 = max(len(c[1]) for c in cells)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in cells)


# --- modes ------------------------------------------------------------------------------------


def limits_mode(args: argparse.Namespace, svc: Services) -> dict[str, Any]:
    from worker.catalog import MODELS

    max_rows = MODELS[args.model].max_rows
    events = make_events(args.events, short=args.short_texts)
    mean_tokens = sum(e.tokens for e in events) / len(events)
    ceiling = ceiling_rows_per_min(args.rpm, args.tpm, max_rows, mean_tokens)
    expected_s = args.events / ceiling * 60
    timeout_s = args.timeout_s or 3 * expected_s + 120

    print(
        f"limits: {args.events} events (mean {mean_tokens:.1f} tokens), ceiling {ceiling:,.0f} rows/min, "
        f"about {expected_s:.0f}s of embedding; {args.workers} workers",
        file=sys.stderr,
    )
    run = run_pipeline(
        svc,
        events,
        name="pipeline",
        workers=args.workers,
        embed_threads=args.embed_threads,
        rpm=args.rpm,
        tpm=args.tpm,
        shared_limiter=True,
        timeout_s=timeout_s,
    )
    figures = provider_figures(run, ceiling)

    naive: dict[str, Any] = {
        "naive_utilization": None,
        "naive_achieved_rows_per_min": None,
        "naive_rate_limited_ratio": None,
        "naive_rows_per_request": None,
    }
    if args.naive_s > 0:
        # Enough events that the naive path cannot drain them in --naive-s (one row per request).
        n = min(args.events, max(50, int(args.rpm * args.naive_s / 60 * 1.5)))
        print(
            f"naive: {n} events for at most {args.naive_s:.0f}s, one document per request, "
            "per-process limiters",
            file=sys.stderr,
        )
        base = make_events(n, prefix="naive", short=args.short_texts)
        naive_run = run_pipeline(
            svc,
            base,
            name="naive",
            workers=args.workers,
            embed_threads=args.embed_threads,
            rpm=args.rpm,
            tpm=args.tpm,
            shared_limiter=False,
            timeout_s=args.naive_s + 60,
            run_for_s=args.naive_s,
            settings={"SIDECAR_CLAIM_DOCS": "1", "SIDECAR_BATCH_MAX_DELAY_S": "0"},
        )
        nf = provider_figures(naive_run, ceiling)
        naive = {
            "naive_utilization": nf["utilization"],
            "naive_achieved_rows_per_min": nf["achieved_rows_per_min"],
            "naive_rate_limited_ratio": nf["rate_limited_ratio"],
            "naive_rows_per_request": nf["rows_per_request"],
            "naive_events": n,
            "naive_drained": naive_run.drained,
        }

    lat = latency_figures(run)
    result = {
        "mode": "limits",
        "events": args.events,
        "workers": args.workers,
        "embed_threads": args.embed_threads,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "latency_ms": args.latency_ms,
        "model": args.model,
        "region": args.region,
        "database": "sqlite" if args.embedded else "postgresql",
        "max_rows": max_rows,
        "mean_tokens_per_row": mean_tokens,
        "ceiling_rows_per_min": ceiling,
        **{
            k: figures[k]
            for k in (
                "achieved_rows_per_min",
                "utilization",
                "rate_limited_ratio",
                "rows_per_request",
                "max_window_rpm",
                "max_window_tpm",
            )
        },
        "latency_p50_s": lat["latency_p50_s"],
        "latency_p99_s": lat["latency_p99_s"],
        "cpu_s_per_1k_events": run.worker_cpu_s / args.events * 1000,
        "peak_rss_mb": run.peak_rss_mb,
        **naive,
        "requests": figures["requests"],
        "accepted_requests": figures["accepted_requests"],
        "rows": figures["rows"],
        "tokens": figures["tokens"],
        "provider_span_s": figures["provider_span_s"],
        "indexed": run.indexed,
        "dead": run.dead,
        "searchable_docs": lat["searchable_docs"],
        "ledger_rows": run.ledger["rows"],
        "ledger_failed": run.ledger["failed"],
        "drain_s": run.finished_at - run.published_at,
        "shared_limiter_keys": run.limiter_keys,
        "emulator_cpu_s": svc.emulator.usage().cpu_s,
    }
    result["targets_met"] = {
        "utilization": result["utilization"] >= 0.95,
        "rate_limited_ratio": result["rate_limited_ratio"] <= 0.01,
        "rows_per_request": result["rows_per_request"] >= 9.5,
        "max_window_rpm": result["max_window_rpm"] <= args.rpm,
        "max_window_tpm": result["max_window_tpm"] <= args.tpm,
    }
    met = result["targets_met"]
    print(
        table(
            [
                (
                    "events (short texts)" if args.short_texts else "events (mixed sizes)",
                    args.events,
                    f"mean {mean_tokens:.1f} tokens, 1 row each; {args.model} in {args.region}",
                ),
                (
                    "workers × embed threads",
                    f"{args.workers} × {args.embed_threads}",
                    "shared limiter keys in Redis: " + str(run.limiter_keys),
                ),
                (
                    "limits",
                    f"{args.rpm} rpm, {args.tpm:,} tpm",
                    f"{args.latency_ms:g} ms latency, {max_rows} rows/request max",
                ),
                ("ceiling rows/min", ceiling, "min(rpm × max rows, tpm ÷ mean tokens per row)"),
                (
                    "achieved rows/min",
                    result["achieved_rows_per_min"],
                    "emulator-accepted rows over first→last accepted request",
                ),
                (
                    "utilization",
                    result["utilization"],
                    f"≥ 0.95  {'met' if met['utilization'] else 'MISSED'}",
                ),
                (
                    "rate-limited ratio",
                    result["rate_limited_ratio"],
                    f"≤ 0.01  {'met' if met['rate_limited_ratio'] else 'MISSED'}",
                ),
                (
                    "rows per request",
                    result["rows_per_request"],
                    f"≥ 9.5  {'met' if met['rows_per_request'] else 'MISSED'}",
                ),
                (
                    "max 60 s window rpm",
                    result["max_window_rpm"],
                    f"≤ {args.rpm}  {'met' if met['max_window_rpm'] else 'MISSED'}",
                ),
                (
                    "max 60 s window tpm",
                    result["max_window_tpm"],
                    f"≤ {args.tpm:,}  {'met' if met['max_window_tpm'] else 'MISSED'}",
                ),
                (
                    "requests (accepted/all)",
                    f"{figures['accepted_requests']}/{figures['requests']}",
                    f"ledger failed {run.ledger['failed']}",
                ),
                ("indexed / searchable docs", f"{run.indexed}/{lat['searchable_docs']}", f"dead {run.dead}"),
                ("latency p50 s", lat["latency_p50_s"], "published → embedded_at in Qdrant"),
                ("latency p99 s", lat["latency_p99_s"], ""),
                ("drain s", result["drain_s"], "first publish → all indexed in SQL"),
                (
                    "worker CPU s / 1k events",
                    result["cpu_s_per_1k_events"],
                    f"ready → stop; startup {run.startup_cpu_s:.1f}s extra",
                ),
                ("peak RSS MB", run.peak_rss_mb, "max VmHWM over worker processes"),
                ("emulator CPU s", result["emulator_cpu_s"], "its own process, not counted above"),
                (
                    "naive utilization",
                    naive["naive_utilization"],
                    "1 doc per claim, per-process limiters, retry on 429",
                ),
                ("naive rate-limited ratio", naive["naive_rate_limited_ratio"], ""),
                ("naive rows per request", naive["naive_rows_per_request"], ""),
            ]
        )
    )
    return result


def overhead_mode(args: argparse.Namespace, svc: Services) -> dict[str, Any]:
    events = make_events(args.events, short=args.short_texts)
    where = "SQLite broker and database" if svc.embedded else "Redis broker, PostgreSQL"
    print(
        f"overhead: {args.events} events, {args.events_per_message} per message, no limits or latency; "
        f"{args.workers} workers; {where}",
        file=sys.stderr,
    )
    run = run_pipeline(
        svc,
        events,
        name="overhead",
        workers=args.workers,
        embed_threads=args.embed_threads,
        rpm=UNLIMITED_RPM,
        tpm=UNLIMITED_TPM,
        shared_limiter=True,
        timeout_s=args.timeout_s or 900,
        per_message=args.events_per_message,
    )
    last = max(run.searchable_at.values()) if run.searchable_at else run.finished_at
    pipeline_rate = args.events / (last - run.published_at)
    figures = provider_figures(run, 0.0)
    noop_rate, noop_cpu_s = noop_rate_per_s(
        svc, args.events, workers=args.workers, concurrency=args.concurrency
    )
    lat = latency_figures(run)
    cpu_per_1k = run.worker_cpu_s / args.events * 1000
    cpu_target = 1.5 if args.events_per_message > 1 else 2.5
    result = {
        "mode": "overhead",
        "database": "sqlite" if svc.embedded else "postgresql",
        "broker": "sqlite" if svc.embedded else "redis",
        "events": args.events,
        "events_per_message": args.events_per_message,
        "workers": args.workers,
        "embed_threads": args.embed_threads,
        "events_per_s": pipeline_rate,
        "noop_tasks_per_s": noop_rate,
        "events_per_noop_task": pipeline_rate / noop_rate if noop_rate else None,
        "rows_per_request": figures["rows_per_request"],
        "latency_p50_s": lat["latency_p50_s"],
        "latency_p99_s": lat["latency_p99_s"],
        "cpu_s_per_1k_events": cpu_per_1k,
        "noop_cpu_s_per_1k_tasks": noop_cpu_s / args.events * 1000,
        "commits_per_event": run.commits / args.events if run.commits is not None else None,
        "peak_rss_mb": run.peak_rss_mb,
        "indexed": run.indexed,
        "searchable_docs": lat["searchable_docs"],
        "emulator_cpu_s": svc.emulator.usage().cpu_s,
    }
    result["targets_met"] = {
        "cpu_s_per_1k_events": cpu_per_1k <= cpu_target,
        "events_per_noop_task": (result["events_per_noop_task"] or 0) >= 0.5,
    }
    met = result["targets_met"]
    commits = result["commits_per_event"]
    print(
        table(
            [
                (
                    "events",
                    args.events,
                    f"{args.workers} workers × {args.embed_threads} embed threads; {where}",
                ),
                ("pipeline events/s", pipeline_rate, "first publish → last embedded_at in Qdrant"),
                ("bare Celery no-op tasks/s", noop_rate, f"{args.events} tasks, one per message, same pool"),
                (
                    "pipeline ÷ no-op",
                    result["events_per_noop_task"],
                    f"≥ 0.5  {'met' if met['events_per_noop_task'] else 'MISSED'}; "
                    f"{args.events_per_message} events per message",
                ),
                ("rows per request", figures["rows_per_request"], ""),
                ("latency p50 s", lat["latency_p50_s"], "published → embedded_at in Qdrant"),
                ("latency p99 s", lat["latency_p99_s"], ""),
                (
                    "worker CPU s / 1k events",
                    cpu_per_1k,
                    f"≤ {cpu_target}  {'met' if met['cpu_s_per_1k_events'] else 'MISSED'}; ready → stop",
                ),
                ("no-op CPU s / 1k tasks", result["noop_cpu_s_per_1k_tasks"], ""),
                (
                    "SQL commits per event",
                    commits,
                    "PostgreSQL xact_commit, ready → drained"
                    if commits is not None
                    else "SQLite: not counted",
                ),
                ("peak RSS MB", run.peak_rss_mb, "max VmHWM over worker processes"),
                ("emulator CPU s", result["emulator_cpu_s"], "its own process"),
            ]
        )
    )
    return result


def latency_mode(args: argparse.Namespace, svc: Services) -> dict[str, Any]:
    """Light load: one event per message at `--rate` events/s; publish → indexed percentiles."""
    events = make_events(args.events, short=args.short_texts)
    where = "SQLite broker and database" if svc.embedded else "Redis broker, PostgreSQL"
    print(f"latency: {args.events} events at {args.rate:g}/s, one per message; {where}", file=sys.stderr)
    run = run_pipeline(
        svc,
        events,
        name="latency",
        workers=args.workers,
        embed_threads=args.embed_threads,
        rpm=UNLIMITED_RPM,
        tpm=UNLIMITED_TPM,
        shared_limiter=True,
        timeout_s=args.timeout_s or args.events / args.rate + 120,
        per_message=1,
        rate=args.rate,
    )
    lat = latency_figures(run)
    p50_target = 0.150 if svc.embedded else 0.100
    p50, p99 = lat["latency_p50_s"], lat["latency_p99_s"]
    result = {
        "mode": "latency",
        "database": "sqlite" if svc.embedded else "postgresql",
        "broker": "sqlite" if svc.embedded else "redis",
        "events": args.events,
        "rate_per_s": args.rate,
        "workers": args.workers,
        "emulator_latency_ms": args.latency_ms,
        "latency_p50_s": p50,
        "latency_p90_s": percentile(
            [run.searchable_at[d] - t for d, t in run.publish_times.items() if d in run.searchable_at], 90
        ),
        "latency_p99_s": p99,
        "latency_max_s": lat["latency_max_s"],
        "slowest_event": lat["slowest_event"],
        "searchable_docs": lat["searchable_docs"],
        "cpu_s_per_1k_events": run.worker_cpu_s / args.events * 1000,
        "commits_per_event": run.commits / args.events if run.commits is not None else None,
    }
    result["targets_met"] = {
        "latency_p50_s": p50 is not None and p50 <= p50_target,
        "latency_p99_s": p99 is not None and p99 <= 0.300,
    }
    met = result["targets_met"]
    print(
        table(
            [
                ("events", args.events, f"{args.rate:g}/s, one per message; {args.workers} workers; {where}"),
                ("emulator latency ms", args.latency_ms, "added to every answer"),
                (
                    "latency p50 s",
                    p50,
                    f"≤ {p50_target}  {'met' if met['latency_p50_s'] else 'MISSED'}; published → embedded_at",
                ),
                ("latency p90 s", result["latency_p90_s"], ""),
                ("latency p99 s", p99, f"≤ 0.3  {'met' if met['latency_p99_s'] else 'MISSED'}"),
                ("latency max s", lat["latency_max_s"], f"event #{lat['slowest_event']} in publish order"),
                ("searchable docs", lat["searchable_docs"], ""),
                (
                    "worker CPU s / 1k events",
                    result["cpu_s_per_1k_events"],
                    "ready → stop, idle polling included",
                ),
                ("SQL commits per event", result["commits_per_event"], "idle polling included"),
            ]
        )
    )
    return result


def noop_rate_per_s(svc: Services, count: int, *, workers: int, concurrency: int) -> tuple[float, float]:
    """Tasks/s of a bare Celery task (one Redis INCR) on the same broker and pool; and worker CPU."""
    import redis

    from worker.settings import Settings
    from worker.tasks import create_celery

    broker_url = svc.run_broker("noop")
    flush_redis(svc.limiter_url)
    counter = redis.Redis.from_url(svc.limiter_url)
    procs = []
    for i in range(workers):
        log_path = svc.workdir / f"noop-worker-{i}.log"
        argv = [
            "-m",
            "bench.throughput",
            "--serve-noop",
            "--broker",
            broker_url,
            "--counter",
            svc.limiter_url,
            "--concurrency",
            str(concurrency),
            "--node",
            f"noop{i}",
        ]
        procs.append((start_process(argv, clean_env(), log_path), log_path))
    try:
        wait_for(
            lambda: int(counter.get(NOOP_READY_KEY) or 0) >= workers,
            timeout_s=60,
            what="no-op workers ready",
            procs=procs,
        )
        ready = [proc_usage(p.pid) for p, _ in procs]
        app = create_celery(Settings(_env_file=None, broker_url=broker_url))
        started = time.time()
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(NOOP_TASK, producer=producer)
        wait_for(
            lambda: int(counter.get(NOOP_DONE_KEY) or 0) >= count,
            timeout_s=300,
            what=f"{count} no-op tasks",
            procs=procs,
            interval_s=0.02,
        )
        elapsed = time.time() - started
        cpu_s = sum(proc_usage(p.pid).cpu_s - r.cpu_s for (p, _), r in zip(procs, ready, strict=True))
    finally:
        for proc, _ in procs:
            stop_process(proc, grace_s=10.0)
        counter.close()
    return count / elapsed, cpu_s


def serve_noop(broker_url: str, counter_url: str, concurrency: int, node: str) -> int:
    """A Celery worker with the sidecar's app settings and one task that only counts itself."""
    import redis
    from celery import signals

    from worker.settings import Settings
    from worker.tasks import create_celery

    app = create_celery(Settings(_env_file=None, broker_url=broker_url))
    counter = redis.Redis.from_url(counter_url)

    @app.task(name=NOOP_TASK)
    def noop() -> None:
        counter.incr(NOOP_DONE_KEY)

    signals.worker_ready.connect(lambda **_: counter.incr(NOOP_READY_KEY), weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            f"--hostname={node}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Embedding throughput against provider rate limits (emulator, Redis, PostgreSQL, "
        "real worker processes); prints a table and, as the last line, one JSON object.",
    )
    add = parser.add_argument
    add("--rpm", type=int, default=600, help="requests per minute, emulator and workers (default 600)")
    add("--tpm", type=int, default=300_000, help="tokens per minute, emulator and workers (default 300000)")
    add(
        "--latency-ms",
        type=float,
        default=None,
        help="emulator latency per answer (default 50; 0 in --latency mode; none in --overhead)",
    )
    add(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default 3; 1 with --embedded or --latency)",
    )
    add(
        "--embed-threads",
        type=int,
        default=None,
        help="embedding loops per worker at most (default as `sidecar worker`: 6)",
    )
    add("--concurrency", type=int, default=4, help="ingest task slots per worker (default 4)")
    add("--events", type=int, default=None, help="events to publish (default 2000; 60 in --latency mode)")
    add(
        "--events-per-message",
        type=int,
        default=PUBLISH_BATCH,
        help=f"events per message (default {PUBLISH_BATCH}; 1: sidecar.ingest, more: sidecar.ingest_many)",
    )
    add(
        "--latency",
        action="store_true",
        help="light load: one event per message at --rate events/s; publish → indexed percentiles",
    )
    add("--rate", type=float, default=2.0, help="--latency mode: events per second (default 2)")
    add(
        "--embedded",
        action="store_true",
        help="the embedded default: SQLite broker and SQLite database instead of Redis and PostgreSQL",
    )
    add("--model", default=MODEL, help=f"embedding model of the workers (default {MODEL})")
    add("--region", default="beijing", choices=("beijing", "singapore"), help="region (default beijing)")
    add(
        "--store",
        default="local",
        choices=("local", "edge"),
        help="each worker's vector store: qdrant-client local mode (default) or Qdrant Edge",
    )
    add("--short-texts", action="store_true", help="only short texts (6-28 words, about 16 tokens)")
    add(
        "--naive-s",
        type=float,
        default=60.0,
        help="longest run of the naive baseline in seconds; 0 skips it (default 60)",
    )
    add(
        "--overhead",
        action="store_true",
        help="no limits or latency: pipeline events/s next to a bare Celery no-op task's rate",
    )
    add(
        "--postgres-url",
        default=os.environ.get(
            "SIDECAR_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="a database on the server where each run creates (and drops) its own database",
    )
    add(
        "--redis-url",
        default=os.environ.get("SIDECAR_BENCH_REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis server; the broker uses db --broker-db, the shared limiter db --limiter-db",
    )
    add("--broker-db", type=int, default=12, help="Redis db of the broker, flushed (default 12)")
    add("--limiter-db", type=int, default=11, help="Redis db of the shared limiter, flushed (default 11)")
    add(
        "--timeout-s",
        type=float,
        default=None,
        help="give up a run after this long (default: from the ceiling)",
    )
    add("--keep", action="store_true", help="keep the work directory (logs, Qdrant paths)")
    # The no-op worker of --overhead runs this module in a child process.
    add("--serve-noop", action="store_true", help=argparse.SUPPRESS)
    add("--broker", help=argparse.SUPPRESS)
    add("--counter", help=argparse.SUPPRESS)
    add("--node", default="noop", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.embed_threads is None:  # as `sidecar worker` (Settings.default_embed_threads)
        from worker.settings import EMBED_THREADS

        args.embed_threads = EMBED_THREADS
    if args.serve_noop:
        return serve_noop(args.broker, args.counter, args.concurrency, args.node)
    args.events = args.events if args.events is not None else (60 if args.latency else 2000)
    args.workers = args.workers if args.workers is not None else (1 if args.embedded or args.latency else 3)
    if args.latency_ms is None:
        args.latency_ms = 0.0 if args.latency else 50.0
    if min(args.events, args.workers, args.rpm, args.tpm, args.events_per_message) < 1 or args.rate <= 0:
        print(
            "bench.throughput: --events, --workers, --rpm, --tpm and --events-per-message must be >= 1, "
            "--rate > 0",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    started = time.monotonic()
    limits: dict[str, float] = {"rpm": args.rpm, "tpm": args.tpm, "latency_ms": args.latency_ms}
    if args.overhead:
        limits = {}
    elif args.latency:
        limits = {"latency_ms": args.latency_ms}
    broker_url = redis_db_url(args.redis_url, args.broker_db)
    limiter_url = redis_db_url(args.redis_url, args.limiter_db)
    emulator = None
    try:
        with exclusive(args.postgres_url, f"bench redis dbs {broker_url} {limiter_url}"):
            emulator = EmulatorProcess(workdir / "emulator.log", **limits)
            svc = Services(
                postgres_url=args.postgres_url,
                broker_url=broker_url,
                limiter_url=limiter_url,
                emulator=emulator,
                workdir=workdir,
                embedded=args.embedded,
                model=args.model,
                region=args.region,
                store=args.store,
            )
            mode = overhead_mode if args.overhead else latency_mode if args.latency else limits_mode
            result = mode(args, svc)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench.throughput: {exc}\nlogs kept in {workdir}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if emulator is not None:
            emulator.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    result["elapsed_s"] = time.monotonic() - started
    if args.keep:
        print(f"work directory: {workdir}")
    print(json.dumps(rounded(result), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
