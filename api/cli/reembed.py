"""`sidecar reembed COLLECTION --model M --dimensions D`, then `--rollback` or `--finalize`:
move a collection to another embedding model without downtime (worker/reembed/control.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError, SidecarError
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.batch.lane import BatchLane
    from worker.runtime import Runtime

PROGRESS_EVERY_S = 1.0
DESCRIPTION = """\
Re-embed COLLECTION with another model or size, without downtime. A new physical collection
COLLECTION__MODEL__DIMENSIONS__N is filled from the text kept in SQL while live changes go on
(the live version always wins; deletes stay deleted); it is then read back and compared with SQL,
and the alias COLLECTION is switched to it in one step. From then on the worker embeds the
collection's changes and searches with the new model, and keeps writing the old collection too,
so that --rollback can switch back; --finalize drops the old collection. Spend is booked in the
ledger under the migration (provider_requests.migration). The work runs in this process when it
can open the store; when a running worker or `sidecar serve` holds the embedded store, that
process carries it out and this command shows the progress. A re-run continues where a killed
one stopped. Progress: `sidecar status --json`, key "migrations".
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reembed", help="move a collection to another model, without downtime", description=DESCRIPTION
    )
    p.add_argument("collection", help="the collection (its alias name)")
    p.add_argument("--model", help="the new model, e.g. text-embedding-v4")
    p.add_argument("--dimensions", type=int, help="the new vector size, e.g. 1024")
    p.add_argument(
        "--lane",
        choices=("realtime", "batch"),
        default="realtime",
        help="how the backfill is paid: realtime, or batch (the provider's Batch API at half the price, "
        "within its completion window; what changes meanwhile is embedded the real-time way)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--rollback", action="store_true", help="switch the alias back to the old collection")
    what.add_argument("--finalize", action="store_true", help="drop the old collection, ending the migration")
    p.add_argument("--detach", action="store_true", help="start or request it, then return at once")
    p.set_defaults(func=cmd_reembed)


def cmd_reembed(args: argparse.Namespace) -> int:
    from worker.reembed import control

    settings = Settings()
    if not (args.rollback or args.finalize) and (args.model is None or args.dimensions is None):
        print("sidecar reembed: give --model and --dimensions (or --rollback / --finalize)", file=sys.stderr)
        return 2
    rt = _open_runtime(settings)
    try:
        if args.rollback or args.finalize:
            what = "rollback" if args.rollback else "finalize"
            mig_id = control.request(rt, args.collection, what)
            goal = "rolled_back" if args.rollback else "finalized"
        else:
            mig_id = control.start(rt, args.collection, args.model, args.dimensions, lane=args.lane)
            goal = "switched"
        if args.detach:
            print(f"migration {mig_id}: requested; `sidecar status` shows its progress")
            return 0
        return _run(rt, mig_id, goal)
    except ConfigError as exc:
        print(f"sidecar reembed: {exc}", file=sys.stderr)
        return 2
    finally:
        rt.close()


def _open_runtime(settings: Settings) -> Runtime:
    """This process's runtime; when the embedded store is held by a worker, one without a
    store of its own (that worker then does the work, this process watches)."""
    from api.cli.context import open_engine
    from worker.runtime import build_runtime

    open_engine(settings).dispose()  # SchemaOutdated before anything else
    try:
        return build_runtime(settings)
    except ConfigError as exc:
        if "another process" not in str(exc):
            raise
        from worker.reembed.watch import WatchOnlyStore

        print("the store is held by a running worker: it carries the migration out", file=sys.stderr)
        return build_runtime(settings, store=WatchOnlyStore())


def _run(rt: Runtime, mig_id: int, goal: str) -> int:
    """Advance (or watch) the migration until it reaches `goal` with its store step done."""
    from worker.reembed.watch import WatchOnlyStore

    here = not isinstance(rt.store, WatchOnlyStore)
    lane = _batch_lane(rt, mig_id) if here else None
    try:
        return _loop(rt, mig_id, goal, here, lane)
    finally:
        if lane is not None:
            lane.client.close()


def _loop(rt: Runtime, mig_id: int, goal: str, here: bool, lane: BatchLane | None) -> int:
    from worker.reembed import control

    shown = 0.0
    while True:
        try:
            more = control.advance(rt, mig_id) if here else False
            if lane is not None:  # the backfill's batch jobs, moved along by this process
                more = bool(lane.step_jobs(_batch_jobs(rt, mig_id))) or more
        except ConfigError:
            raise
        except SidecarError:  # a provider or store outage: on the row as last_error; try again
            more = False
            time.sleep(1.0)
        row = _row(rt, mig_id)
        if time.monotonic() - shown >= PROGRESS_EVERY_S or (row["state"] == goal and not row["pending_step"]):
            print(_progress(row), file=sys.stderr, flush=True)
            shown = time.monotonic()
        if row["state"] == goal and not row["pending_step"]:
            print(f"migration {mig_id}: {goal} ({row['collection']} → {_target(row, goal)})")
            return 0
        if row["state"] in ("finalized", "rolled_back") and row["state"] != goal:
            print(f"sidecar reembed: the migration ended {row['state']}", file=sys.stderr)
            return 1
        if not more:
            time.sleep(0.2)


def _batch_lane(rt: Runtime, mig_id: int) -> BatchLane | None:
    """The batch lane of a migration on the batch lane (None for a real-time one)."""
    from worker.batch.lane import BatchLane

    return BatchLane(rt) if _row(rt, mig_id)["lane"] == "batch" else None


def _batch_jobs(rt: Runtime, mig_id: int) -> list[str]:
    from worker.reembed import batched
    from worker.sql.reembed_models import Migration

    with rt.sessions() as session:
        mig = session.get(Migration, mig_id)
    return list(batched.jobs(rt, mig)) if mig is not None else []


def _row(rt: Runtime, mig_id: int) -> dict[str, Any]:
    from worker.reembed import control

    with rt.sessions.begin() as session:
        return next(r for r in control.status(session) if r["id"] == mig_id)


def _target(row: dict[str, Any], goal: str) -> str:
    return str(row["from"] if goal == "rolled_back" else row["to"])


def _progress(row: dict[str, Any]) -> str:
    step = f" ({row['pending_step']})" if row["pending_step"] else ""
    error = f"  last error: {row['last_error'][:100]}" if row["last_error"] else ""
    jobs = f", {row['batch_jobs_running']} batch job(s) running" if row.get("batch_jobs_running") else ""
    return f"{row['collection']}: {row['state']}{step} {row['done']}/{row['total']} documents{jobs}{error}"


def render_migrations(rows: list[dict[str, Any]]) -> list[str]:
    """The migrations block of `sidecar status`."""
    if not rows:
        return []
    lines = ["migrations"]
    for r in rows:
        lines.append(
            f"  {r['id']:>4}  {r['collection']:<16}{r['state']:<13}{r['done']:>8}/{r['total']:<8}"
            f"  {r['from']} → {r['to']}"
        )
    return lines
