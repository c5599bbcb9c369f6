"""`sidecar emulator`: its flags, and the command that reads them and the control token's variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping

from api.emulator.config import REGIONS, EmulatorConfig
from api.emulator.control import check_exposure
from api.emulator.runner import serve

CONTROL_TOKEN_ENV = "SIDECAR_EMULATOR_CONTROL_TOKEN"


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig of parsed `sidecar emulator` flags (unset flags keep defaults)."""
    fields = {f.name for f in dataclasses.fields(EmulatorConfig)} - {"api_keys"}
    values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.api_key:
        values["api_keys"] = tuple(args.api_key)
    return EmulatorConfig(**values)


def control_token_of(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """--control-token, else the SIDECAR_EMULATOR_CONTROL_TOKEN variable; empty means none."""
    return args.control_token or environ.get(CONTROL_TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    """The `sidecar emulator` command: check the flags, then serve until interrupted."""
    token = control_token_of(args, os.environ)
    try:
        config = config_from_args(args)
        check_exposure(args.host, token)
    except ValueError as exc:
        print(f"sidecar emulator: {exc}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}"
    guarded = "yes" if token else "no"
    print(f"emulator.listening url={url} region={config.region} control_token={guarded}", flush=True)
    serve(config, args.host, args.port, token)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `sidecar emulator` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "emulator",
        help="serve an offline DashScope embedding emulator (both APIs, limits, faults, bill)",
        description="Serve both DashScope embedding APIs offline at the provider's paths. "
        "Control endpoints: GET /_emulator/bill, GET /_emulator/log, GET|POST /_emulator/config, "
        "POST /_emulator/reset.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8765, help="port to listen on (default 8765)")
    add(
        "--control-token",
        metavar="TOKEN",
        help=f"bearer token the /_emulator/ endpoints require (default: ${CONTROL_TOKEN_ENV}); "
        "needed when --host is not a loopback address",
    )
    add("--region", choices=REGIONS, help="region whose models are served (default beijing)")
    add(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accepted API key; repeat for several (default sk-emulator)",
    )
    _add_limit_and_fault_flags(parser)
    parser.set_defaults(func=run)
    return parser


def _add_limit_and_fault_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--rpm", type=int, help="requests per model per minute before 429 Throttling.RateQuota")
    add("--tpm", type=int, help="tokens per model per minute before 429 Throttling.AllocationQuota")
    add("--rps", type=int, help="requests per model per second before 429 Throttling.BurstRate")
    add("--tps", type=int, help="tokens per model per second before 429 Throttling.BurstRate")
    add("--latency-ms", type=float, help="added latency of every answer in milliseconds")
    add("--error-rate", type=float, help="share of requests answered 500/503 (0..1)")
    add("--throttle-rate", type=float, help="share of requests answered 429 at random (0..1)")
    add("--hang-rate", type=float, help="share of requests that sleep --hang-s first (0..1)")
    add("--hang-s", type=float, help="how long a hanging request sleeps (default 30)")
    add("--truncate-rate", type=float, help="share of 200 answers with a cut JSON body (0..1)")
    add(
        "--inspection-marker",
        help="texts containing this fail with DataInspectionFailed (default <<BLOCKED>>)",
    )
    add("--token-factor", type=float, help="scale counted tokens by this (simulates drift)")
    add("--seed", type=int, help="seed of the fault-injection random draws (default 0)")
    add(
        "--batch-duration-s",
        type=float,
        help="Batch API: a job's life cycle (validating to completed) in seconds (default 10)",
    )
    add("--batch-fail-rate", type=float, help="Batch API: share of lines that fail with a 500 (0..1)")
    add(
        "--batch-expire-rate",
        type=float,
        help="Batch API: share of jobs that expire with half their lines done (0..1)",
    )
    add("--batch-max-lines", type=int, help="Batch API: requests per job (default 50000)")
