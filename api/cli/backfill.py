"""`sidecar backfill FILE.jsonl [--lane batch|realtime] [--yes]`: price a backfill on both lanes,
ask before publishing it, publish every valid event through Celery on the chosen lane, then show
progress until each document has settled (indexed, deleted or dead).

The estimate is `sidecar estimate`'s (api/cli/spend.py): tokens and cost at each lane's price,
and the least time on each lane: the real-time limits for `realtime`; for `batch`, one collect
wait and one poll at best, the completion window at worst (the provider schedules batch jobs; the
rate limits do not apply to them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from api.cli.spend import EventReader, estimate_backfill, render_estimate
from worker.errors import ConfigError
from worker.settings import Settings

PER_MESSAGE = 100  # events per sidecar.ingest_many message
KEY_CHUNK = 500


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backfill",
        help="price a JSONL backfill on both lanes, confirm, publish it and show progress",
        description="Read events (one JSON object per line, the event contract of README.md), "
        "print tokens, cost and least time on the real-time and the batch lane, ask before "
        "publishing (--yes skips the question; without a terminal it is required), publish every "
        "valid event with the chosen lane through Celery (sidecar.ingest_many), then show progress "
        "until every document has settled. The batch lane costs half and runs within the "
        "provider's completion window; the real-time lane runs at the rate limits.",
    )
    p.add_argument("file", help="JSONL file of events")
    p.add_argument(
        "--lane",
        choices=("batch", "realtime"),
        default="batch",
        help="lane every event is sent on (default batch: half the price)",
    )
    p.add_argument("--yes", action="store_true", help="publish without asking")
    p.add_argument("--no-wait", action="store_true", help="publish, then exit without waiting")
    p.add_argument("--timeout-s", type=float, default=None, help="stop showing progress after this long")
    p.add_argument("--json", action="store_true", help="print the estimate and the outcome as JSON")
    p.set_defaults(func=cmd_backfill)


def cmd_backfill(args: argparse.Namespace) -> int:
    settings = Settings()
    data = {"file": args.file, **_estimate(args.file, settings), "lane": args.lane}
    print(json.dumps(data, indent=2) if args.json else render_backfill(data), flush=True)
    if not _confirmed(args, data):
        return 2
    keys = publish_file(args.file, settings, args.lane)
    print(f"published: {len(keys)} documents on the {args.lane} lane", flush=True)
    if args.no_wait:
        return 0
    settled = wait_settled(settings, keys, timeout_s=args.timeout_s)
    return 0 if settled else 1


def _estimate(path: str, settings: Settings) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = estimate_backfill(fh, settings, progress=sys.stderr.isatty())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    best_s = settings.batch_collect_s + settings.batch_poll_interval_s
    data["batch_min_duration_s"] = round(best_s, 3)
    data["batch_window"] = settings.batch_completion_window
    data["batch_jobs"] = -(-data["rows"] // settings.batch_max_lines) if data["rows"] else 0
    from worker.batch.report import unavailable_reason

    data["batch_fallback_reason"] = unavailable_reason(settings)
    return data


def render_backfill(data: dict[str, Any]) -> str:
    lines = [render_estimate(data)]
    lines.append(f"{'least time, batch':<24}{_batch_time(data):>24}")
    lines.append(f"{'batch jobs':<24}{data['batch_jobs']:>24}")
    if data["batch_fallback_reason"]:
        lines.append(f"batch lane unavailable ({data['batch_fallback_reason']}): it would run real-time")
    lines.append(f"lane chosen: {data['lane']}")
    return "\n".join(lines)


def _batch_time(data: dict[str, Any]) -> str:
    return f"{data['batch_min_duration_s']:.0f}s .. {data['batch_window']}"


def _confirmed(args: argparse.Namespace, data: dict[str, Any]) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(
            "sidecar backfill: not published: confirm on a terminal, or pass --yes to publish",
            file=sys.stderr,
        )
        return False
    cost = data["batch_cost_cny"] if args.lane == "batch" else data["cost_cny"]
    try:
        answer = input(f"publish {data['documents']} documents on the {args.lane} lane (CNY {cost})? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        print("sidecar backfill: not published", file=sys.stderr)
        return False
    return True


def _events(path: str, settings: Settings, lane: str) -> Iterator[dict[str, Any]]:
    """Every valid event of the file as JSON again, carrying `lane` (invalid lines are skipped:
    the estimate listed them)."""
    reader = EventReader(settings)
    with open(path, encoding="utf-8") as fh:
        for event in reader.parse(fh):
            raw = {
                "op": event.op,
                "doc_id": event.doc_id,
                "collection": event.collection,
                "tenant": event.tenant,
                "lane": lane,
            }
            for name in ("version", "text", "metadata", "event_id"):
                if getattr(event, name) is not None:
                    raw[name] = getattr(event, name)
            yield raw


def publish_file(path: str, settings: Settings, lane: str) -> set[tuple[str, str, str]]:
    """Publish the file's valid events on `lane`; the (tenant, collection, doc_id) published."""
    from worker.tasks import create_celery

    app = create_celery(settings)
    keys: set[tuple[str, str, str]] = set()
    batch: list[dict[str, Any]] = []
    with app.producer_or_acquire() as producer:
        for event in _events(path, settings, lane):
            keys.add((event["tenant"], event["collection"], event["doc_id"]))
            batch.append(event)
            if len(batch) >= PER_MESSAGE:
                app.send_task("sidecar.ingest_many", args=[batch], producer=producer)
                batch = []
        if batch:
            app.send_task("sidecar.ingest_many", args=[batch], producer=producer)
    return keys


def settled_counts(settings: Settings, keys: set[tuple[str, str, str]]) -> dict[str, int]:
    """The published documents by status (a document not recorded yet counts as `waiting`)."""
    import sqlalchemy as sa

    from api.cli.context import run_report
    from worker.sql.models import Document

    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for tenant, collection, doc_id in keys:
        groups[(tenant, collection)].append(doc_id)

    def count(session: Any) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for (tenant, collection), doc_ids in groups.items():
            for start in range(0, len(doc_ids), KEY_CHUNK):
                rows = session.execute(
                    sa.select(Document.status, sa.func.count())
                    .where(Document.tenant == tenant, Document.collection == collection)
                    .where(Document.doc_id.in_(doc_ids[start : start + KEY_CHUNK]))
                    .group_by(Document.status)
                ).all()
                for status, n in rows:
                    counts[status] += int(n)
        counts["waiting"] = len(keys) - sum(counts.values())
        return dict(counts)

    return run_report(settings, count)


def wait_settled(settings: Settings, keys: set[tuple[str, str, str]], *, timeout_s: float | None) -> bool:
    """Show progress until no published document is pending (or waiting); False on timeout."""
    started = time.monotonic()
    tty = sys.stdout.isatty()
    last = ""
    while True:
        counts = settled_counts(settings, keys)
        open_ = counts.get("pending", 0) + counts.get("waiting", 0)
        line = (
            f"progress: {len(keys) - open_}/{len(keys)} settled · indexed {counts.get('indexed', 0)} · "
            f"deleted {counts.get('deleted', 0)} · dead {counts.get('dead', 0)} · pending {open_} · "
            f"{time.monotonic() - started:.0f}s"
        )
        if line != last:
            print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if not open_:
            if tty:
                print()
            return True
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            print(
                f"\nsidecar backfill: {open_} documents still pending after {timeout_s:.0f}s", file=sys.stderr
            )
            return False
        time.sleep(2.0)
