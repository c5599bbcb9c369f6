"""`sidecar spend` (and the spend audit commands that follow): the ledger summed for people."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spend", help="provider requests, billed tokens and cost by day and model",
                       description="The spend ledger summed by UTC day and model. Tokens are the "
                       "provider-billed tokens; cost is CNY at the model's real-time price.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_spend)


def cmd_spend(args: argparse.Namespace) -> int:
    from api.cli import reports_of
    from worker import reports

    print(render_spend(reports_of(reports.spend), as_json=args.json))
    return 0


def render_spend(data: dict[str, Any], *, as_json: bool) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    head = f"{'day':<12}{'model':<20}{'requests':>10}{'failed':>8}{'rows':>9}{'tokens':>12}{'cost CNY':>16}"
    lines = [head, "-" * len(head)]
    for r in [*data["rows"], {"day": "total", "model": "", **data["total"]}]:
        lines.append(f"{r['day']:<12}{r['model']:<20}{r['requests']:>10}{r['failed']:>8}{r['rows']:>9}"
                     f"{r['tokens']:>12}{r['cost_cny']:>16}")
    return "\n".join(lines)
