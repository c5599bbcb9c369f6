"""A backfill on each lane: cost, wall time and ledger = bill.

    python -m bench.backfill --docs 20000
    python -m bench.backfill --docs 2000 --batch-duration-s 5 --dimensions 1024

For each lane in turn (a fresh emulator process, SQLite ledger and Qdrant Edge store in a
temporary directory): the documents (one chunk each, ~40 tokens, distinct texts) are accepted
as the ingest task would (`worker.intake.ingest_events`) with `"lane"` set, the worker's
embedding service (worker/service.py: embedding threads and the batch lane) runs in this
process, and the clock stops when every document is indexed. The real-time lane meets the
emulator's limits of 1,800 requests and 1.2M tokens per minute (Beijing's, for v4); the batch
lane meets the emulator's Batch API, whose job life cycle is compressed into
--batch-duration-s (the provider's takes up to the 24 h completion window). Then the ledger is
reconciled with the emulator's bill. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import EmulatorProcess
from worker.catalog import cny_str
from worker.intake import ingest_events
from worker.ledger import billing
from worker.runtime import build_runtime
from worker.service import EmbedService
from worker.settings import Settings
from worker.sql import schema
from worker.sql.batch_models import BatchJob
from worker.sql.models import Document, ProviderRequest

WORDS = (
    "tea kettle river stone market lamp window garden paper cloud harbor engine violet silver "
    "orchard ledger mountain copper lantern meadow signal anchor pepper canyon velvet thunder"
).split()


def texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(30)) for i in range(n)]


def run_lane(lane: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    root.mkdir(parents=True)
    emulator = EmulatorProcess(
        root / "emulator.log", rpm=1800, tpm=1_200_000, batch_duration_s=args.batch_duration_s
    )
    settings = Settings(
        _env_file=None,
        data_dir=root,
        dashscope_url=emulator.url,
        dashscope_api_key="sk-emulator",
        embedding_dimensions=args.dimensions,
        batch_collect_s=0.0,
        batch_poll_interval_s=args.poll_s,
        reconcile_interval_s=0,
    )
    schema.upgrade(settings.resolved_database_url())
    rt = build_runtime(settings)
    service = EmbedService(rt, threads=args.threads, reconcile=False)
    try:
        events = [
            {"op": "upsert", "doc_id": f"d{i}", "text": t, "lane": lane}
            for i, t in enumerate(texts(args.docs))
        ]
        started, started_at = time.monotonic(), time.time()
        for start in range(0, len(events), 1000):
            ingest_events(rt, events[start : start + 1000])
        service.start()
        while _pending(rt) and time.monotonic() - started < args.timeout_s:
            time.sleep(0.5)
        wall_s = time.monotonic() - started
        return {**_figures(lane, rt, emulator, wall_s), **_stages(rt, started_at)}
    finally:
        service.stop()
        rt.close()
        emulator.stop()


def _pending(rt: Any) -> int:
    with rt.sessions() as session:
        return int(
            session.execute(
                sa.select(sa.func.count()).select_from(Document).where(Document.status != "indexed")
            ).scalar_one()
        )


def _figures(lane: str, rt: Any, emulator: EmulatorProcess, wall_s: float) -> dict[str, Any]:
    bill = emulator.client.get("/_emulator/bill").raise_for_status().json()
    with rt.sessions() as session:
        requests, tokens, cost = session.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(ProviderRequest.billed_tokens), 0),
                sa.func.coalesce(sa.func.sum(ProviderRequest.cost_nano_cny), 0),
            )
        ).one()
        report = billing.reconcile(session, bill["requests"])
        indexed = session.execute(
            sa.select(sa.func.count()).select_from(Document).where(Document.status == "indexed")
        ).scalar_one()
    return {
        "lane": lane,
        "documents_indexed": int(indexed),
        "ledger_rows": int(requests),
        "billed_tokens": int(tokens),
        "cost_cny": cny_str(int(cost)),
        "wall_s": round(wall_s, 1),
        "bill_tokens": int(bill["total_tokens"]),
        "bill_entries": len(bill["requests"]),
        "ledger_equals_bill": report.balanced and int(tokens) == int(bill["total_tokens"]),
    }


def _stages(rt: Any, started_at: float) -> dict[str, Any]:
    """Batch lane only: seconds from the first publish to the first job packed and submitted,
    and to the last job done (the rest of the wall time is importing and writing)."""
    with rt.sessions() as session:
        packed, submitted, done = session.execute(
            sa.select(
                sa.func.min(BatchJob.created_at),
                sa.func.min(BatchJob.submitted_at),
                sa.func.max(BatchJob.finished_at),
            )
        ).one()
    if packed is None:
        return {}
    at = {"packed_s": packed, "submitted_s": submitted, "done_s": done}
    return {name: round(value.timestamp() - started_at, 1) for name, value in at.items() if value is not None}


def render(figures: dict[str, Any]) -> str:
    lanes = figures["lanes"]
    rows = [
        ("documents indexed", "documents_indexed"),
        ("ledger rows", "ledger_rows"),
        ("billed tokens", "billed_tokens"),
        ("cost CNY", "cost_cny"),
        ("wall time s", "wall_s"),
        ("bill entries", "bill_entries"),
        ("ledger = bill", "ledger_equals_bill"),
        ("batch packed at s", "packed_s"),
        ("batch submitted at s", "submitted_s"),
        ("batch done at s", "done_s"),
    ]
    lines = [f"{'':<20}" + "".join(f"{lane['lane']:>16}" for lane in lanes)]
    for title, key in rows:
        lines.append(f"{title:<20}" + "".join(f"{lane.get(key, '-')!s:>16}" for lane in lanes))
    lines.append(
        f"{figures['docs']} documents, {figures['dimensions']} dimensions; real-time limits 1,800 RPM / "
        f"1.2M TPM; batch job life cycle compressed to {figures['batch_duration_s']:g} s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--lanes", default="realtime,batch", help="comma-separated (default both)")
    parser.add_argument("--dimensions", type=int, default=256, help="vector size (default 256)")
    parser.add_argument("--batch-duration-s", type=float, default=30.0, help="emulator's job life cycle")
    parser.add_argument("--poll-s", type=float, default=2.0, help="batch poll interval")
    parser.add_argument("--threads", type=int, default=2, help="embedding threads")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-backfill-", ignore_cleanup_errors=True) as tmp:
        lanes = [run_lane(lane, args, Path(tmp) / lane) for lane in args.lanes.split(",")]
    figures = {
        "bench": "backfill",
        "docs": args.docs,
        "dimensions": args.dimensions,
        "batch_duration_s": args.batch_duration_s,
        "lanes": lanes,
    }
    print(render(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
