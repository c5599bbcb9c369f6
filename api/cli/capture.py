"""`sidecar capture`: change capture from the application's database (worker/capture/)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from worker.errors import ConfigError
from worker.settings import Settings

SOURCES_HELP = """\
The sources file is TOML, one [[sources]] table per source:

  [[sources]]
  name = "articles"                  # ^[a-z0-9_]{1,48}$: the slot / consumer group, status, metrics
  kind = "postgres"                  # logical replication with pgoutput
  dsn_env = "APP_DATABASE_URL"       # or dsn = "host=... dbname=..." (keep secrets out of the file)
  table = "public.articles"
  where = "published"                # optional row filter (PostgreSQL >= 15); leaving it deletes
  collection = "articles"
  doc_id = "{id}"                    # templates over the row's columns
  text = "{title}\\n\\n{body}"
  metadata = ["lang", "author_id"]   # columns copied into metadata
  tenant = "{org_id}"                # optional

  [[sources]]
  name = "products"
  kind = "debezium"                  # the Redis Stream of Debezium Server's Redis sink
  stream = "app.public.products"     # <prefix>.<schema>.<table>
  redis_url = "redis://redis:6379/0" # default: SIDECAR_REDIS_URL
  collection = "products"
  doc_id = "{id}"
  text = "{name}: {description}"

Each change becomes an event (version: the commit LSN; snapshot rows: the slot's consistent
point; Debezium: source.lsn, binlog file+pos or ts_ms) committed through the same accept path
as sidecar.ingest before its position is acknowledged. A source owns its collection: a truncate
or --resync deletes the collection's documents the table does not hold.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "capture",
        help="sync from the application's database: PostgreSQL logical replication, Debezium streams",
        description="Run the sources of a TOML file until stopped (SIGTERM/Ctrl-C): a first "
        "snapshot, then every change, committed as document states before the source's position "
        "is acknowledged.\n\n" + SOURCES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sources", required=True, metavar="FILE", help="the sources file (TOML, above)")
    p.add_argument("--once", action="store_true", help="drain what each source holds now, then exit")
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--resync",
        metavar="NAME",
        help="re-snapshot source NAME (rows go to the batch lane when SIDECAR_CAPTURE_SNAPSHOT_LANE=batch) "
        "and delete the documents its table no longer holds, then exit",
    )
    action.add_argument(
        "--drop-slot",
        metavar="NAME",
        help="drop source NAME's replication slot and publication (Debezium: its consumer group) "
        "and forget its state, then exit; do it when a source is removed for good, since an "
        "abandoned slot keeps WAL and fills the database's disk",
    )
    p.set_defaults(func=cmd_capture)


def cmd_capture(args: argparse.Namespace) -> int:
    from worker import logs
    from worker.capture import runner
    from worker.capture.sources import load_sources
    from worker.sql import schema

    settings = Settings()
    logs.configure(settings.log_level)
    sources = load_sources(Path(args.sources), default_redis_url=settings.redis_url)
    rt = runner.capture_runtime(settings)
    try:
        schema.check_schema(rt.engine)
        if args.drop_slot or args.resync:
            name = args.drop_slot or args.resync
            found = [s for s in sources if s.name == name]
            if not found:
                raise ConfigError(f"no source named {name!r} in {args.sources}")
            return _drop(rt, found[0]) if args.drop_slot else _resync(rt, found[0])
        return _run(rt, sources, once=args.once)
    except ConfigError:
        raise
    except Exception as exc:  # a source unreachable: one line, no traceback
        print(f"sidecar capture: {runner.describe_error(exc)}", file=sys.stderr)
        return 1
    finally:
        rt.close()


def _run(rt: Any, sources: list[Any], *, once: bool) -> int:
    from worker.capture import runner

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    failures = runner.run_sources(rt, sources, stop=stop, once=once)
    for failure in failures:
        print(f"sidecar capture: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _drop(rt: Any, source: Any) -> int:
    from contextlib import closing

    import redis

    from worker.capture import pgcatalog, state

    if source.kind == "postgres":
        with closing(pgcatalog.connect(source.dsn)) as conn:
            dropped = pgcatalog.drop_slot(conn, source)
        what = f"slot {source.slot} {'dropped' if dropped else 'was not there'}; publication dropped"
    else:
        client = redis.Redis.from_url(source.redis_url)
        try:
            dropped = bool(client.xgroup_destroy(source.stream, source.name))
        except redis.ResponseError:  # no such stream
            dropped = False
        finally:
            client.close()
        what = f"consumer group {source.name} {'dropped' if dropped else 'was not there'}"
    with rt.sessions.begin() as session:
        state.forget(session, source.name)
    print(f"{source.name}: {what}; state forgotten")
    return 0


def _resync(rt: Any, source: Any) -> int:
    from worker.capture.postgres import PostgresCapture

    if source.kind != "postgres":
        raise ConfigError(
            f"source {source.name!r} is a Debezium stream: re-snapshot it in Debezium (an incremental "
            "snapshot signal); its rows arrive as op r"
        )
    result = PostgresCapture(rt, source, stop=threading.Event()).resync()
    print(json.dumps({"source": source.name, **result}))
    return 0


def render_sources(sources: list[dict[str, Any]]) -> list[str]:
    """`sidecar status` lines of the capture sources (none when there are none)."""
    if not sources:
        return []
    head = f"  {'name':<20}{'up':<4}{'position':<20}{'lag':>12}{'lag s':>9}{'rows/s':>9}  last error"
    lines = ["sources", head]
    for s in sources:
        lag = "-" if s["lag_bytes"] is None else f"{s['lag_bytes']}B"
        lag_s = "-" if s["lag_s"] is None else f"{s['lag_s']:.1f}"
        position, error = s["position"] or "-", (s["last_error"] or "-")[:60]
        up = "yes" if s["up"] else "no"
        lines.append(
            f"  {s['name']:<20}{up:<4}{position:<20}{lag:>12}{lag_s:>9}{s['rows_per_s']:>9}  {error}"
        )
    return lines
