"""The emulator's mutable state: config, bill, log, rate windows and the fault RNG, behind one lock."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from api.emulator.batch import BatchStore
from api.emulator.config import EmulatorConfig
from api.emulator.errors import ProviderError
from api.emulator.limits import RateWindows

BILL_FIELDS = ("request_id", "model", "api", "tokens", "at")


class EmulatorState:
    """Shared by every request of one app; each method takes the lock itself."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Empty the bill, the log and the windows; reseed the fault RNG from the config."""
        with self.lock:
            self.bill: list[dict[str, Any]] = []
            self.total_tokens = 0
            self.log: list[dict[str, Any]] = []
            self.windows = RateWindows()
            self.rng = random.Random(self.config.seed)
            self.batches = BatchStore()  # the Batch File API's files and jobs

    def patch_config(self, patch: dict[str, Any]) -> EmulatorConfig:
        """Apply a JSON patch to the live config (ConfigFieldError if invalid) and return it."""
        with self.lock:
            self.config = self.config.patched(patch)
            return self.config

    def admit(self, model: str, tokens: int) -> ProviderError | None:
        """Check and record one request against the rate windows; the error if it is over."""
        now = time.monotonic()
        with self.lock:
            return self.windows.admit(self.config, model, tokens, now)

    def draw(self, rate: float) -> bool:
        """True for a share `rate` of calls, drawn from the seeded RNG."""
        if rate <= 0:
            return False
        with self.lock:
            return self.rng.random() < rate

    def choice(self, options: list[Callable[[], ProviderError]]) -> ProviderError:
        with self.lock:
            return self.rng.choice(options)()

    def record(self, entry: dict[str, Any], charged: bool) -> None:
        """Log a request; bill it too if it was `charged`."""
        with self.lock:
            self.log.append(entry)
            if charged:
                self.bill.append({k: entry[k] for k in BILL_FIELDS})
                self.total_tokens += entry["tokens"]

    def charge(self, entries: list[dict[str, Any]]) -> None:
        """Bill the charged lines of a finished batch job (each entry already in bill form)."""
        with self.lock:
            self.bill.extend(entries)
            self.total_tokens += sum(entry["tokens"] for entry in entries)

    def finish_batches(self) -> None:
        """Run the batch jobs whose time has come, so that the bill and the jobs are current."""
        self.batches.finish_due(self.config, self.draw, self.charge)

    def bill_snapshot(self) -> dict[str, Any]:
        self.finish_batches()
        with self.lock:
            return {"total_tokens": self.total_tokens, "requests": list(self.bill)}

    def log_snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.log)
