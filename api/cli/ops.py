"""`sidecar status`, `sidecar deadletters` and `sidecar reconcile`: look at the state and repair it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from api.cli.context import open_engine, run_report, run_transaction
from worker.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="documents by status, requests by outcome, backlog age",
        description="Counts of documents (pending, indexed, deleted, rejected, dead) and "
        "provider requests, read from SQL.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    add_deadletters_parser(sub)
    p = sub.add_parser(
        "reconcile",
        help="repair drift between SQL and Qdrant once, then exit",
        description="What the worker does periodically: close ledger rows abandoned "
        "mid-call as unknown (with their estimate), re-drive indexed documents whose "
        "points are missing or wrong, delete points of deleted or unknown documents. "
        "With local-mode Qdrant, stop the worker first (one process per path).",
    )
    p.set_defaults(func=cmd_reconcile)


def add_deadletters_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "deadletters",
        help="list dead letters or send them back for another try",
        description="Documents that gave up (status dead): the provider refused their "
        "text, or their work never finished after SIDECAR_MAX_ATTEMPTS tries.",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    q = actions.add_parser(
        "list",
        help="list dead letters with their reasons",
        description="List dead letters: id, collection, doc_id, version, attempts, reason.",
    )
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    q.set_defaults(func=cmd_deadletters_list)
    q = actions.add_parser(
        "retry",
        help="send one dead letter (ID) or all (--all) back to pending",
        description="Send dead letters back to pending with their attempts reset; the "
        "worker picks them up again.",
    )
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the dead letter's id (from `list`)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    q.set_defaults(func=cmd_deadletters_retry)

    def no_action(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_action)


def cmd_status(args: argparse.Namespace) -> int:
    from worker.capture.exposition import sources_report
    from worker.ledger import reports

    settings = Settings()
    from worker.reembed import control

    report = run_report(
        settings,
        lambda s: {
            **reports.status(s, settings),
            "sources": sources_report(s),
            "migrations": control.status(s),
        },
    )
    print(render_status(report, as_json=args.json))
    return 0


def render_status(data: dict[str, Any], *, as_json: bool) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    docs, reqs = data["documents"], data["requests"]
    lines = ["documents"] + [f"  {k:<10}{v:>10}" for k, v in docs.items()]
    lines += ["requests"] + [f"  {k:<10}{v:>10}" for k, v in reqs.items()]
    age = data["oldest_pending_age_s"]
    lines.append(f"oldest pending: {'-' if age is None else f'{age:.1f}s'}")
    for key, value in data.items():  # anything else the report carries (pauses, budgets)
        if key not in ("documents", "requests", "oldest_pending_age_s", "sources", "migrations"):
            lines.append(f"{key}: {json.dumps(value)}")
    from api.cli.capture import render_sources

    lines += render_sources(data.get("sources") or [])
    from api.cli.reembed import render_migrations

    lines += render_migrations(data.get("migrations") or [])
    return "\n".join(lines)


def cmd_deadletters_list(args: argparse.Namespace) -> int:
    from worker.sql import deadletters

    rows = run_report(Settings(), lambda s: deadletters.list_dead(s, limit=args.limit))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no dead letters")
    else:
        print(render_deadletters(rows))
    return 0


def render_deadletters(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'id':>8}  {'collection':<16}{'doc_id':<28}{'version':>10}{'attempts':>9}  reason"]
    for r in rows:
        reason = " ".join((r["last_error"] or "").split())[:80]
        lines.append(
            f"{r['id']:>8}  {r['collection']:<16}{r['doc_id'][:27]:<28}{r['version']:>10}"
            f"{r['attempts']:>9}  {reason}"
        )
    return "\n".join(lines)


def cmd_deadletters_retry(args: argparse.Namespace) -> int:
    from worker.sql import deadletters

    which = None if args.all else args.id
    count = run_transaction(Settings(), lambda s: deadletters.retry_dead(s, which))
    if not count and not args.all:
        print(f"sidecar: no dead letter with id {args.id}", file=sys.stderr)
        return 1
    print(f"{count} dead letter(s) sent back to pending")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from worker import logs, reconciler
    from worker.embedding.offline import OfflineEmbedder
    from worker.runtime import build_runtime

    settings = Settings()
    logs.configure(settings.log_level)
    open_engine(settings).dispose()
    rt = build_runtime(settings, embedder=OfflineEmbedder.from_settings(settings))  # calls no provider
    try:
        report = reconciler.reconcile(rt)
    finally:
        rt.close()
    print(
        f"abandoned ledger rows closed: {report.abandoned_requests}; documents re-driven: "
        f"{report.redriven}; points removed: {report.removed}"
    )
    return 0
