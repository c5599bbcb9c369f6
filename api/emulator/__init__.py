"""A faithful offline server of both DashScope embedding APIs (`sidecar emulator`).

Modules: `config` (EmulatorConfig and its rules), `vectors` (deterministic vectors), `errors` (the
provider's error catalogue), `parsing` (requests of both APIs), `answers` (their success bodies),
`limits` (rate windows), `state` (bill, log, RNG), `control` (the `/_emulator/` endpoints and
their token), `server` (the ASGI app), `runner` (serve, or run on a thread) and `cli`; the Batch
File API in `batch` (files, jobs, life cycle), `batch_input` (its input rules) and `batch_routes`.
"""

from __future__ import annotations

from api.emulator.cli import add_parser, config_from_args
from api.emulator.config import REGIONS, ConfigFieldError, EmulatorConfig
from api.emulator.control import ExposureError, check_exposure
from api.emulator.errors import ProviderError
from api.emulator.runner import RunningEmulator, serve, start_in_thread
from api.emulator.server import create_app
from api.emulator.vectors import expected_sparse, expected_vector

__all__ = [
    "REGIONS",
    "ConfigFieldError",
    "EmulatorConfig",
    "ExposureError",
    "ProviderError",
    "RunningEmulator",
    "add_parser",
    "check_exposure",
    "config_from_args",
    "create_app",
    "expected_sparse",
    "expected_vector",
    "serve",
    "start_in_thread",
]
