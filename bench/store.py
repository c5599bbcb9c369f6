"""The embedded stores side by side: Qdrant Edge (the default) against qdrant-client local mode.

For each backend, in fresh processes: load `--points` chunk points of `--dims` dimensions through
the store adapter (documents of 8 chunks, 10 tenants; ingest points/s and RSS after the load; for
Edge also the time `optimize()` takes to build the index), then reopen the store (time to the
first answer, RSS) and run tenant-filtered searches (queries/s, p50/p99 latency). Prints a table,
then one JSON line with every figure.

    python -m bench.store                      # 50,000 points of 1024 dims: local mode takes long
    python -m bench.store --points 2000        # a quick run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, percentile

CHUNKS_PER_DOC = 8
TENANTS = 10
COLLECTION = "bench"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_store(backend: str, path: Path) -> Any:
    from qdrant_client import QdrantClient

    from worker.vectorstore.edge import EdgeStore
    from worker.vectorstore.qdrant import QdrantStore

    if backend == "edge":
        return EdgeStore(path)
    return QdrantStore(QdrantClient(path=str(path)))


def unit_rows(seed: int, rows: int, dims: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((rows, dims), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def load(backend: str, path: Path, points: int, dims: int) -> dict[str, Any]:
    from worker.vectorstore.base import ChunkVector

    store = open_store(backend, path)
    docs = -(-points // CHUNKS_PER_DOC)
    start = time.perf_counter()
    for d in range(docs):
        n = min(CHUNKS_PER_DOC, points - d * CHUNKS_PER_DOC)
        vectors = unit_rows(d, n, dims)
        chunks = [
            ChunkVector(i, f"chunk {i} of document {d} " * 8, f"{d:032x}{i:08x}", vectors[i].tolist())
            for i in range(n)
        ]
        meta = {"src": "bench", "n": d}
        store.write_document(
            COLLECTION, f"t{d % TENANTS}", f"doc{d}", 1, chunks, meta=meta, model="bench", dimensions=dims
        )
    load_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "load_s": round(load_s, 2),
        "ingest_points_per_s": round(points / load_s, 1),
        "rss_after_load_mb": round(rss_mb(), 1),
        "count": store.count(COLLECTION),
    }
    if backend == "edge":
        start = time.perf_counter()
        store.optimize(COLLECTION)
        out["optimize_s"] = round(time.perf_counter() - start, 2)
    store.close()
    return out


def reopen(backend: str, path: Path, queries: int, dims: int) -> dict[str, Any]:
    import qdrant_client  # noqa: F401 - imports are not part of the reopen time

    import worker.vectorstore.edge  # noqa: F401

    start = time.perf_counter()
    store = open_store(backend, path)
    count = store.count(COLLECTION)  # the first answer: local mode loads everything on open
    reopen_s = time.perf_counter() - start
    out: dict[str, Any] = {"reopen_s": round(reopen_s, 2), "rss_after_reopen_mb": round(rss_mb(), 1)}
    qs = unit_rows(10**6, queries, dims)
    latencies = []
    start = time.perf_counter()
    for i in range(queries):
        t0 = time.perf_counter()
        hits = store.search(COLLECTION, qs[i].tolist(), limit=5, tenant=f"t{i % TENANTS}")
        latencies.append(time.perf_counter() - t0)
        assert all(h.tenant == f"t{i % TENANTS}" for h in hits)
    elapsed = time.perf_counter() - start
    out.update(
        count=count,
        queries=queries,
        search_qps=round(queries / elapsed, 1),
        search_p50_ms=round((percentile(latencies, 50) or 0) * 1000, 2),
        search_p99_ms=round((percentile(latencies, 99) or 0) * 1000, 2),
        rss_after_queries_mb=round(rss_mb(), 1),
    )
    store.close()
    return out


def child(phase: str, backend: str, path: str, number: int, dims: int) -> dict[str, Any]:
    """One phase in a fresh process; its last stdout line is the JSON result."""
    argv = [sys.executable, "-m", "bench.store", "--child", phase, backend, path, str(number), str(dims)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{backend} {phase} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"points": args.points, "dims": args.dims}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for backend in args.backends.split(","):
            path = str(Path(tmp) / backend)
            queries = args.queries if backend == "edge" else args.local_queries
            print(f"{backend}: loading {args.points} points…", file=sys.stderr, flush=True)
            figures = child("load", backend, path, args.points, args.dims)
            print(f"{backend}: reopening and searching…", file=sys.stderr, flush=True)
            figures.update(child("reopen", backend, path, queries, args.dims))
            if figures["count"] != args.points:
                raise SystemExit(f"{backend}: {figures['count']} points stored, not {args.points}")
            results[backend] = figures
    return results


ROWS = [
    ("ingest points/s", "ingest_points_per_s"),
    ("load s", "load_s"),
    ("RSS after load MB", "rss_after_load_mb"),
    ("optimize s", "optimize_s"),
    ("reopen s", "reopen_s"),
    ("RSS after reopen MB", "rss_after_reopen_mb"),
    ("filtered search q/s", "search_qps"),
    ("search p50 ms", "search_p50_ms"),
    ("search p99 ms", "search_p99_ms"),
    ("queries run", "queries"),
]


def table(results: dict[str, Any], backends: list[str]) -> str:
    lines = [
        f"{results['points']} points x {results['dims']} dims",
        f"{'':22}" + "".join(f"{b:>14}" for b in backends),
    ]
    for label, key in ROWS:
        cells = "".join(f"{results[b].get(key, '-')!s:>14}" for b in backends)
        lines.append(f"{label:22}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        phase, backend, path, number, dims = argv[1:6]
        fn = load if phase == "load" else reopen
        print(json.dumps(fn(backend, Path(path), int(number), int(dims))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=50_000)
    p.add_argument("--dims", type=int, default=1024)
    p.add_argument("--queries", type=int, default=500, help="filtered searches on Edge")
    p.add_argument("--local-queries", type=int, default=20, help="on local mode (about 2 s each at 20k)")
    p.add_argument("--backends", default="edge,local")
    args = p.parse_args(argv)
    results = run(args)
    print(table(results, args.backends.split(",")))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
