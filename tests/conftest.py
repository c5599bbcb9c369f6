"""Shared fixtures: real services, skipped on a laptop when missing, failing when CI=true."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.emulator",
    "tests.fixtures.runtime",
    "tests.fixtures.pgcluster",
]
