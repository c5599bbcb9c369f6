"""`sidecar`: the command line. Each subcommand has --help; errors print one line, never a traceback.

The commands live in groups, each with its `add_parsers`: api/cli/run.py (worker, api, migrate),
api/cli/ops.py (status, deadletters, reconcile), api/cli/spend.py (spend, bill, estimate),
api/cli/search.py, api/cli/demo.py, api/cli/capture.py (capture), and the emulator's own parser.
"""

from __future__ import annotations

import argparse
import sys

from api import emulator
from api.cli import backfill, capture, demo, ops, run, search, spend, store
from api.cli import reembed as reembed_cli
from worker.errors import ConfigError, SchemaOutdated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SchemaOutdated) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Keep a Qdrant vector store in sync with your application's text, embedding with "
        "DashScope and recording every provider request in a SQL spend ledger. Settings come from "
        "SIDECAR_* environment variables (and .env); see README.md.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    run.add_parsers(sub)
    ops.add_parsers(sub)
    emulator.add_parser(sub)
    demo.add_parser(sub)
    spend.add_parsers(sub)
    search.add_parser(sub)
    store.add_parsers(sub)
    backfill.add_parser(sub)
    capture.add_parser(sub)
    reembed_cli.add_parser(sub)
    return parser
