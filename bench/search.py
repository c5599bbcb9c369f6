"""Search throughput and latency: queries/s and p50/p99 of fresh queries (one paid embedding call
each) and of repeated ones (served from the in-process query cache), then of a mix.

    python -m bench.search --points 10000
    python -m bench.search --points 50000 --latency-ms 50 --queries 2000 --threads 8

The store is the embedded default (`worker.runtime.build_store` with no path or URL) in a
temporary directory, or a Qdrant server with --qdrant-url; the ledger is SQLite there, or
--database-url (an empty PostgreSQL database, say). Points are
written straight into the store (one document of one chunk each, its vector the emulator's
`expected_vector` of its text), so loading is quick. The emulator runs in its own process and
answers every call after --latency-ms; the rate limits are set far above the load, so the figures are the
sidecar's. Fresh queries are document texts never asked before; cached ones repeat them.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from api.emulator import expected_vector
from bench.common import EmulatorProcess, percentile
from worker.runtime import Runtime, build_runtime
from worker.search import Searcher
from worker.settings import Settings
from worker.sql import schema
from worker.vectorstore.base import ChunkVector

COLLECTION = "bench"
WORDS = (
    "tea coffee river mountain bread garden winter harbour lantern copper silence market autumn "
    "violin glacier orchard meadow thunder library compass saffron harvest ember velvet canyon"
).split()


def text_of(i: int) -> str:
    rng = random.Random(i)
    return f"note {i}: " + " ".join(rng.choice(WORDS) for _ in range(12))


def load_points(rt: Runtime, points: int) -> float:
    """Write `points` one-chunk documents; returns the seconds it took."""
    started = time.monotonic()
    model, dims = rt.embedder.model, rt.embedder.dimensions
    rt.store.ensure_collection(COLLECTION, dims)
    for i in range(points):
        text = text_of(i)
        chunk = ChunkVector(0, text, f"h{i}", expected_vector(model, dims, text))
        rt.store.write_document(
            COLLECTION, "default", f"doc-{i}", 1, [chunk], meta={"n": i % 10}, model=model, dimensions=dims
        )
    return time.monotonic() - started


def run_queries(searcher: Searcher, texts: list[str], threads: int) -> dict[str, Any]:
    """Queries/s over the run and p50/p99 of each query's latency; how many were cached."""

    def one(text: str) -> tuple[float, bool]:
        started = time.perf_counter()
        result = searcher.search(COLLECTION, text, limit=10)
        return (time.perf_counter() - started) * 1000, result.cached

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(one, texts))
    elapsed = time.monotonic() - started
    latencies = sorted(ms for ms, _ in outcomes)
    return {
        "queries": len(texts),
        "cached": sum(cached for _, cached in outcomes),
        "qps": round(len(texts) / elapsed, 1) if elapsed > 0 else None,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    emulator = EmulatorProcess(root / "emulator.log", latency_ms=args.latency_ms)
    database_url = args.database_url or f"sqlite:///{root / 'sidecar.sqlite'}"
    settings = Settings(
        _env_file=None,
        data_dir=root,
        database_url=database_url,
        qdrant_url=args.qdrant_url,
        collection_prefix=f"b{int(time.time())}_" if args.qdrant_url else "",
        dashscope_url=emulator.url,
        dashscope_api_key="sk-emulator",
        requests_per_minute=10**6,
        tokens_per_minute=10**9,
        search_cache_size=max(1024, args.queries),
    )
    schema.upgrade(database_url)
    rt = build_runtime(settings)
    try:
        load_s = load_points(rt, args.points)
        searcher = Searcher(rt)
        rng = random.Random(7)
        picks = rng.sample(range(args.points), min(args.points, args.queries))
        fresh = [text_of(i) for i in picks]
        half = len(fresh) // 2
        figures = {
            "points": args.points,
            "threads": args.threads,
            "latency_ms": args.latency_ms,
            "database": database_url.split(":", 1)[0],
            "load_s": round(load_s, 1),
            "fresh": run_queries(searcher, fresh[:half], args.threads),
            "cached": run_queries(searcher, fresh[:half], args.threads),
        }
        mixed = fresh[half:] + fresh[:half]  # half new, half repeated
        rng.shuffle(mixed)
        figures["mixed"] = run_queries(searcher, mixed, args.threads)
        figures["provider_calls"] = len(emulator.log())
        return figures
    finally:
        rt.close()
        emulator.stop()


def render(figures: dict[str, Any]) -> str:
    lines = [
        f"points {figures['points']}, {figures['threads']} threads, provider answers in "
        f"{figures['latency_ms']} ms, ledger on {figures['database']}, "
        f"points loaded in {figures['load_s']} s",
        f"{'queries':<8} {'count':>7} {'cached':>7} {'q/s':>9} {'p50 ms':>9} {'p99 ms':>9}",
    ]
    for name in ("fresh", "cached", "mixed"):
        f = figures[name]
        lines.append(
            f"{name:<8} {f['queries']:>7} {f['cached']:>7} {f['qps']:>9} {f['p50_ms']:>9} {f['p99_ms']:>9}"
        )
    lines.append(
        "fresh: one embedding call each (ledger row, limiter, budget check); cached: the same texts "
        "again, from the query cache; mixed: half of each, shuffled."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1000, help="distinct query texts (default 1000)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--qdrant-url", help="a Qdrant server instead of the embedded store")
    parser.add_argument("--database-url", help="ledger database (default: SQLite in the directory)")
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.dir:
        figures = bench(args, Path(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-search-") as tmp:
            figures = bench(args, Path(tmp))
    print(render(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
