"""`sidecar spend`, `sidecar bill` and `sidecar estimate`: the ledger summed for people, checked
against the provider's bill, and a backfill priced before it is sent (worker/estimate.py)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from api.cli.context import run_report, run_transaction
from worker import estimate
from worker.catalog import cny_str
from worker.errors import ConfigError, InvalidEvent
from worker.events import Event, parse_with
from worker.ledger.reports import GROUPINGS
from worker.settings import Settings

_NUMBERS = (
    ("requests", 10),
    ("failed", 8),
    ("rows", 9),
    ("tokens", 12),
    ("tokens_avoided_dedup", 12),
    ("tokens_avoided_coalesced", 12),
    ("cost_cny", 16),
)
_HEADS = {"tokens_avoided_dedup": "dedup", "tokens_avoided_coalesced": "coalesced", "cost_cny": "cost CNY"}
_BILL_FIGURES = (
    "balanced",
    "applied",
    "bill_requests",
    "bill_tokens",
    "ledger_tokens",
    "matched_by_id",
    "matched_by_estimate",
    "unknown_not_billed",
)
MAX_INVALID_EXAMPLES = 20


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "spend",
        help="provider requests, billed tokens and cost by day and model (or --by)",
        description="The spend ledger summed by UTC day and model, or by one grouping. "
        "Tokens are the provider-billed tokens; cost is CNY at the model's real-time price; "
        "`dedup` and `coalesced` are tokens avoided (never sent). `--by lane` splits the "
        "realtime, batch and query (search) calls.",
    )
    p.add_argument("--by", choices=GROUPINGS, help="group by this instead of day and model")
    p.add_argument("--since", type=_instant, help="from this UTC instant (ISO 8601, e.g. 2026-11-01)")
    p.add_argument("--until", type=_instant, help="up to, not including, this UTC instant")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    p.set_defaults(func=cmd_spend)

    p = sub.add_parser(
        "bill",
        help="reconcile the ledger with the provider's bill",
        description="Match every charged request of a bill (a JSON file, or a URL such as "
        'the emulator\'s http://127.0.0.1:8765/_emulator/bill: {"requests": [{request_id, '
        "model, tokens, at}]}) to the ledger: by provider request id, else (rows of unknown "
        "outcome) by model, estimate and time. --apply writes the matches, and closes unknown "
        "rows no bill entry claims at 0 tokens. Exit 1 when the two do not balance.",
    )
    p.add_argument("source", help="bill JSON file, or an http(s) URL")
    p.add_argument("--apply", action="store_true", help="write the matches into the ledger")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bill)

    p = sub.add_parser(
        "estimate",
        help="price a backfill (JSONL events) before anything is sent",
        description="Read events (one JSON object a line), coalesce them per document, chunk "
        "and deduplicate as the worker would, and print the tokens, requests, cost at the "
        "real-time and the batch price, and the least time at the configured rate limits. "
        "Nothing is sent and no database is needed.",
    )
    p.add_argument("file", help="JSONL file of events; - for stdin")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)


def _instant(text: str) -> dt.datetime:
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


# --- spend ------------------------------------------------------------------------------------


def cmd_spend(args: argparse.Namespace) -> int:
    from worker.ledger import reports

    data = run_report(Settings(), lambda s: reports.spend(s, by=args.by, since=args.since, until=args.until))
    print(
        render_spend(data, as_json=args.json, as_csv=getattr(args, "csv", False)),
        end="" if args.csv else "\n",
    )
    return 0


def _key_names(data: dict[str, Any]) -> list[str]:
    return str(data["by"]).split(",")


def render_spend(data: dict[str, Any], *, as_json: bool, as_csv: bool = False) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    keys = _key_names(data)
    total = {**{k: "" for k in keys}, keys[0]: "total", **data["total"]}
    if as_csv:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*keys, *(name for name, _ in _NUMBERS)])
        for r in [*data["rows"], total]:
            writer.writerow(
                [r.get(k) if r.get(k) is not None else "" for k in keys] + [r[n] for n, _ in _NUMBERS]
            )
        return buf.getvalue()
    widths = {k: max([len(k), 6, *(len(str(r.get(k) or "")) for r in data["rows"])]) + 2 for k in keys}
    head = "".join(f"{k:<{widths[k]}}" for k in keys) + "".join(
        f"{_HEADS.get(n, n):>{w}}" for n, w in _NUMBERS
    )
    lines = [head, "-" * len(head)]
    for r in [*data["rows"], total]:
        lines.append(
            "".join(f"{r.get(k) if r.get(k) is not None else '-'!s:<{widths[k]}}" for k in keys)
            + "".join(f"{r[n]:>{w}}" for n, w in _NUMBERS)
        )
    return "\n".join(lines)


# --- estimate ---------------------------------------------------------------------------------


def cmd_estimate(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.file == "-":
        data = estimate_backfill(sys.stdin, settings)
    else:
        try:
            with open(args.file, encoding="utf-8") as fh:
                data = estimate_backfill(fh, settings, progress=sys.stderr.isatty())
        except OSError as exc:
            raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    data = {"file": args.file, **data}
    print(json.dumps(data, indent=2) if args.json else render_estimate(data))
    return 0


@dataclass
class EventReader:
    """Parses JSONL lines into events: counts them and keeps the first invalid ones with reasons."""

    settings: Settings
    progress: bool = False
    events: int = 0
    invalid: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def parse(self, lines: Iterable[str]) -> Iterator[Event]:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            self.events += 1
            if self.progress and self.events % 10_000 == 0:
                print(f"\rread {self.events} events", end="", file=sys.stderr, flush=True)
            try:
                event = parse_with(json.loads(line), self.settings)
            except (InvalidEvent, ValueError) as exc:
                self.reject(number, exc)
                continue
            yield event
        if self.progress and self.events >= 10_000:
            print(file=sys.stderr)

    def reject(self, number: int, exc: Exception) -> None:
        self.invalid += 1
        if len(self.examples) < MAX_INVALID_EXAMPLES:
            rule = f"{exc.field}: {exc.rule}" if isinstance(exc, InvalidEvent) else f"not JSON ({exc})"
            self.examples.append({"line": number, "reason": rule})


def estimate_backfill(lines: Iterable[str], settings: Settings, *, progress: bool = False) -> dict[str, Any]:
    """Price a backfill the way the worker would embed it: coalesce, chunk, dedup, batch."""
    spec = settings.model_spec()
    limits = settings.rate_limits()
    reader = EventReader(settings, progress=progress)
    plan = estimate.plan(
        reader.parse(lines),
        spec,
        chunk_max_tokens=settings.chunk_max_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
    )
    return {
        "events": reader.events,
        "invalid": reader.invalid,
        "invalid_examples": reader.examples,
        "documents": plan.documents,
        "deletes": plan.deletes,
        "chunks": plan.chunks,
        "rows": plan.rows,
        "requests": plan.requests,
        "tokens": plan.tokens,
        "tokens_avoided": {"dedup": plan.tokens_avoided_dedup, "coalesced": plan.tokens_avoided_coalesced},
        "model": spec.name,
        "cost_cny": cny_str(spec.cost_nano_cny(plan.tokens)),
        "batch_cost_cny": cny_str(spec.cost_nano_cny(plan.tokens, batch=True)),
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "min_duration_s": round(estimate.min_duration_s(plan.requests, plan.tokens, limits), 3),
    }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s"


def render_estimate(data: dict[str, Any]) -> str:
    rows = [
        ("events", data["events"]),
        ("invalid events", data["invalid"]),
        ("documents", data["documents"]),
        ("deletes (free)", data["deletes"]),
        ("chunks", data["chunks"]),
        ("rows to embed", data["rows"]),
        ("requests", data["requests"]),
        ("tokens", data["tokens"]),
        ("avoided by dedup", data["tokens_avoided"]["dedup"]),
        ("avoided by coalescing", data["tokens_avoided"]["coalesced"]),
        ("model", data["model"]),
        ("cost CNY, real-time", data["cost_cny"]),
        ("cost CNY, batch", data["batch_cost_cny"]),
        ("limits", f"{data['requests_per_minute']} req/min, {data['tokens_per_minute']} tokens/min"),
        ("least time", _duration(data["min_duration_s"])),
    ]
    lines = [f"{name:<24}{value:>24}" for name, value in rows]
    for bad in data["invalid_examples"]:
        lines.append(f"  line {bad['line']}: {bad['reason']}")
    return "\n".join(lines)


# --- bill -------------------------------------------------------------------------------------


def cmd_bill(args: argparse.Namespace) -> int:
    from worker.ledger import billing

    try:
        bill = read_bill(args.source)
    except ValueError as exc:
        print(f"sidecar bill: cannot read the bill from {args.source}: {exc}", file=sys.stderr)
        return 2
    report = run_transaction(Settings(), lambda s: billing.reconcile(s, bill, apply=args.apply))
    out = report.as_dict()
    print(json.dumps(out, indent=2) if args.json else render_bill(out))
    return 0 if report.balanced else 1


def read_bill(source: str) -> list[Any]:
    """The charged requests of a bill file or URL; ValueError when it cannot be read."""
    import httpx

    try:
        if source.startswith(("http://", "https://")):
            data = httpx.get(source, timeout=30).raise_for_status().json()
        else:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        bill = data["requests"] if isinstance(data, dict) else data
    except (OSError, ValueError, KeyError, httpx.HTTPError) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(bill, list):
        raise ValueError('expected a list of requests, or an object with one under "requests"')
    return bill


def render_bill(out: dict[str, Any]) -> str:
    lines = [f"{key:<22}{out[key]}" for key in _BILL_FIGURES]
    for key in ("token_mismatches", "missing_from_ledger", "not_on_bill"):
        lines.append(f"{key:<22}{len(out[key])}" + (f"  e.g. {out[key][:3]}" if out[key] else ""))
    return "\n".join(lines)
