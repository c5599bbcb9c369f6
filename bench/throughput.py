"""Throughput against the provider's rate limits, on real processes and services.

    python -m bench.throughput --events 2000                       # quick: about 2 minutes
    python -m bench.throughput --rpm 600 --tpm 300000 --latency-ms 50 --workers 3 --events 10000
    python -m bench.throughput --overhead --events 5000            # pipeline vs a bare Celery task

Limits mode: the emulator (its own process) enforces --rpm/--tpm with --latency-ms per answer;
--workers `sidecar worker` processes consume from Redis (db 12, flushed) with PostgreSQL (a fresh
database per run) for state and ledger, SIDECAR_REDIS_URL on Redis db 11 for the shared limiter,
and each its own local Qdrant path (standing in for hosts sharing one Qdrant server; so the
periodic reconciler, which would take the other paths' documents for drift, is off). Events of
mixed sizes are published as fast as Celery takes them. Then the naive baseline runs on the same
emulator (reset) and a fresh database: one document per claim (one row per request), a
per-process limiter set to the full limits, retries on 429; it runs for --naive-s at most.

Overhead mode: the emulator without limits or latency; end-to-end events/s next to the rate of a
bare Celery no-op task (one INCR on Redis) on the same broker, pool and worker count.

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


def make_events(count: int, *, seed: int = 7, prefix: str = "doc") -> list[BenchEvent]:
    """`count` deterministic events of mixed sizes, each text unique (no cache hits)."""
    from worker.tokens import count_tokens

    rng = random.Random(seed)
    shares = [share for share, _, _ in SIZE_MIX]
    events = []
    for i in range(count):
        _, low, high = rng.choices(SIZE_MIX, weights=shares)[0]
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


def publish(broker_url: str, events: list[BenchEvent]) -> dict[str, float]:
    """Send every event through Celery in batches; the unix time each doc's batch was sent."""
    from worker.settings import Settings
    from worker.tasks import create_celery

    app = create_celery(Settings(_env_file=None, broker_url=broker_url))
    published: dict[str, float] = {}
    with app.producer_or_acquire() as producer:
        for start in range(0, len(events), PUBLISH_BATCH):
            batch = events[start : start + PUBLISH_BATCH]
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
    extra: dict[str, Any] = field(default_factory=dict)


def worker_env(
    svc: Services, database_url: str, index: int, *, rpm: int, tpm: int, shared_limiter: bool, **settings: str
) -> dict[str, str]:
    home = svc.workdir / f"worker-{index}"
    home.mkdir(parents=True, exist_ok=True)
    return clean_env(
        SIDECAR_DATA_DIR=str(home),
        SIDECAR_QDRANT_PATH=str(home / "qdrant"),
        SIDECAR_BROKER_URL=svc.broker_url,
        SIDECAR_DATABASE_URL=database_url,
        SIDECAR_REDIS_URL=svc.limiter_url if shared_limiter else None,
        DASHSCOPE_API_KEY="sk-emulator",
        SIDECAR_DASHSCOPE_URL=svc.emulator.url,
        SIDECAR_EMBEDDING_MODEL=MODEL,
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
) -> RunResult:
    """Workers up, events published, wait until every doc is indexed (or `run_for_s` passed),
    workers stopped; then the emulator's log, the ledger and each worker's Qdrant are read."""
    import sqlalchemy as sa

    svc.emulator.reset()
    flush_redis(svc.broker_url)
    flush_redis(svc.limiter_url)
    with temp_database(svc.postgres_url, prefix=f"bench_{name}") as database_url:
        base_env = worker_env(svc, database_url, 0, rpm=rpm, tpm=tpm, shared_limiter=shared_limiter)
        migrate = start_process(["-m", "api.cli", "migrate"], base_env, svc.workdir / f"{name}-migrate.log")
        if migrate.wait() != 0:
            raise RuntimeError(f"sidecar migrate failed:\n{tail(svc.workdir / f'{name}-migrate.log')}")

        procs = []
        for i in range(workers):
            env = worker_env(
                svc, database_url, i, rpm=rpm, tpm=tpm, shared_limiter=shared_limiter, **(settings or {})
            )
            env["SIDECAR_QDRANT_PATH"] = str(svc.workdir / f"{name}-qdrant-{i}")
            log_path = svc.workdir / f"{name}-worker-{i}.log"
            argv = [
                "-m",
                "api.cli",
                "worker",
                "--pool",
                "threads",
                "--embed-threads",
                str(embed_threads),
                "--loglevel",
                "INFO",
            ]
            procs.append((start_process(argv, env, log_path), log_path))
        engine = sa.create_engine(database_url)
        try:
            wait_for(
                lambda: all("embed.started" in tail(p, 10**7) for _, p in procs),
                timeout_s=60,
                what=f"{workers} workers ready",
                procs=procs,
                interval_s=0.2,
            )
            ready = [proc_usage(proc.pid) for proc, _ in procs]

            started = time.time()
            publish_times = publish(svc.broker_url, events)
            progress = Progress(name, len(events), started)

            def settled() -> dict[str, int] | None:
                with engine.connect() as conn:
                    counts = dict(
                        conn.execute(sa.text("select status, count(*) from documents group by status")).all()
                    )
                progress.show(counts)
                done = counts.get("indexed", 0) + counts.get("dead", 0) >= len(events)
                over = run_for_s is not None and time.time() - started >= run_for_s
                return counts if done or over else None

            counts = wait_for(
                settled,
                timeout_s=timeout_s,
                what=f"{len(events)} documents indexed",
                procs=procs,
                interval_s=0.25,
            )
            finished = time.time()
            progress.close()
            drained = counts.get("indexed", 0) + counts.get("dead", 0) >= len(events)
            end = [proc_usage(proc.pid) for proc, _ in procs]
        finally:
            for proc, _ in procs:  # a cut-off run has nothing left worth a graceful stop
                stop_process(proc, grace_s=30.0 if run_for_s is None else 3.0)
            engine.dispose()
        with sa.create_engine(database_url).connect() as conn:
            ledger = (
                conn.execute(
                    sa.text(
                        "select count(*) filter (where status = 'succeeded') as succeeded, "
                        "count(*) filter (where status <> 'succeeded') as failed, "
                        "coalesce(sum(rows) filter (where status = 'succeeded'), 0) as rows, "
                        "coalesce(sum(billed_tokens), 0) as tokens from provider_requests"
                    )
                )
                .mappings()
                .one()
            )
    log = svc.emulator.log()
    return RunResult(
        events=len(events),
        drained=drained,
        indexed=counts.get("indexed", 0),
        dead=counts.get("dead", 0),
        published_at=started,
        finished_at=finished,
        log=log,
        ledger=dict(ledger),
        searchable_at=read_searchable([svc.workdir / f"{name}-qdrant-{i}" for i in range(workers)])
        if run_for_s is None
        else {},
        publish_times=publish_times,
        worker_cpu_s=sum(e.cpu_s - r.cpu_s for e, r in zip(end, ready, strict=True)),
        startup_cpu_s=sum(r.cpu_s for r in ready),
        peak_rss_mb=max(e.peak_rss_mb for e in end),
        limiter_keys=redis_keys(svc.limiter_url),
        cutoff=None if drained else finished,
    )


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


def read_searchable(paths: list[Path]) -> dict[str, float]:
    """doc_id -> the earliest `embedded_at` of its points, over every worker's local Qdrant."""
    from qdrant_client import QdrantClient

    found: dict[str, float] = {}
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
    }


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

    max_rows = MODELS[MODEL].max_rows
    events = make_events(args.events)
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
        base = make_events(n, prefix="naive")
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
                ("events (mixed sizes)", args.events, f"mean {mean_tokens:.1f} tokens, 1 row each"),
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
    events = make_events(args.events)
    print(f"overhead: {args.events} events, no limits or latency; {args.workers} workers", file=sys.stderr)
    run = run_pipeline(
        svc,
        events,
        name="overhead",
        workers=args.workers,
        embed_threads=args.embed_threads,
        rpm=UNLIMITED_RPM,
        tpm=UNLIMITED_TPM,
        shared_limiter=True,
        timeout_s=args.timeout_s or 600,
    )
    last = max(run.searchable_at.values()) if run.searchable_at else run.finished_at
    pipeline_rate = args.events / (last - run.published_at)
    figures = provider_figures(run, 0.0)
    noop_rate, noop_cpu_s = noop_rate_per_s(
        svc, args.events, workers=args.workers, concurrency=args.concurrency
    )
    lat = latency_figures(run)
    result = {
        "mode": "overhead",
        "events": args.events,
        "workers": args.workers,
        "embed_threads": args.embed_threads,
        "events_per_s": pipeline_rate,
        "noop_tasks_per_s": noop_rate,
        "events_per_noop_task": pipeline_rate / noop_rate if noop_rate else None,
        "rows_per_request": figures["rows_per_request"],
        "latency_p50_s": lat["latency_p50_s"],
        "latency_p99_s": lat["latency_p99_s"],
        "cpu_s_per_1k_events": run.worker_cpu_s / args.events * 1000,
        "noop_cpu_s_per_1k_tasks": noop_cpu_s / args.events * 1000,
        "peak_rss_mb": run.peak_rss_mb,
        "indexed": run.indexed,
        "searchable_docs": lat["searchable_docs"],
        "emulator_cpu_s": svc.emulator.usage().cpu_s,
    }
    print(
        table(
            [
                ("events", args.events, f"{args.workers} workers × {args.embed_threads} embed threads"),
                ("pipeline events/s", pipeline_rate, "first publish → last embedded_at in Qdrant"),
                ("bare Celery no-op tasks/s", noop_rate, f"{args.events} tasks, one per message, same pool"),
                (
                    "pipeline ÷ no-op",
                    result["events_per_noop_task"],
                    f"pipeline publishes {PUBLISH_BATCH} events per message",
                ),
                ("rows per request", figures["rows_per_request"], ""),
                ("latency p50 s", lat["latency_p50_s"], "published → embedded_at in Qdrant"),
                ("latency p99 s", lat["latency_p99_s"], ""),
                ("worker CPU s / 1k events", result["cpu_s_per_1k_events"], "ready → stop"),
                ("no-op CPU s / 1k tasks", result["noop_cpu_s_per_1k_tasks"], ""),
                ("peak RSS MB", run.peak_rss_mb, "max VmHWM over worker processes"),
                ("emulator CPU s", result["emulator_cpu_s"], "its own process"),
            ]
        )
    )
    return result


def noop_rate_per_s(svc: Services, count: int, *, workers: int, concurrency: int) -> tuple[float, float]:
    """Tasks/s of a bare Celery task (one Redis INCR) on the same broker and pool; and worker CPU."""
    import redis

    from worker.settings import Settings
    from worker.tasks import create_celery

    flush_redis(svc.broker_url)
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
            svc.broker_url,
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
        app = create_celery(Settings(_env_file=None, broker_url=svc.broker_url))
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
    add("--latency-ms", type=float, default=50.0, help="emulator latency per answer (default 50)")
    add("--workers", type=int, default=3, help="worker processes (default 3)")
    add("--embed-threads", type=int, default=2, help="embedding loops per worker (default 2)")
    add("--concurrency", type=int, default=4, help="ingest task slots per worker (default 4)")
    add("--events", type=int, default=2000, help="events to publish (default 2000)")
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
    if args.serve_noop:
        return serve_noop(args.broker, args.counter, args.concurrency, args.node)
    if args.events < 1 or args.workers < 1 or args.rpm < 1 or args.tpm < 1:
        print("bench.throughput: --events, --workers, --rpm and --tpm must be >= 1", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    started = time.monotonic()
    limits = {} if args.overhead else {"rpm": args.rpm, "tpm": args.tpm, "latency_ms": args.latency_ms}
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
            )
            result = overhead_mode(args, svc) if args.overhead else limits_mode(args, svc)
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
