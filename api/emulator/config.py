"""The emulator's settings (`EmulatorConfig`) and the rule every field must satisfy.

A field that breaks its rule raises `ConfigFieldError` naming the field and the rule, both when the
CLI builds the config and when `POST /_emulator/config` patches it live (answered 422 there).
Numbers must be finite: JSON's `NaN` and `Infinity`, which Python's decoder accepts, are refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.catalog import REGION_URLS

REGIONS = tuple(REGION_URLS)
MAX_LATENCY_MS = 600_000
MAX_HANG_S = 3_600
MAX_TOKEN_FACTOR = 1_000
MAX_BATCH_DURATION_S = 14 * 86_400
MAX_BATCH_LINES = 50_000
SECRET_MASK = "***"


@dataclass(frozen=True)
class EmulatorConfig:
    region: str = "beijing"
    api_keys: tuple[str, ...] = ("sk-emulator",)
    rpm: int | None = None  # requests per model per sliding minute; None = unlimited
    tpm: int | None = None  # tokens per model per sliding minute
    rps: int | None = None  # requests per model per second (burst protection)
    tps: int | None = None  # tokens per model per second (burst protection)
    latency_ms: float = 0.0
    error_rate: float = 0.0  # share answered 500 InternalError / 503 ModelServingError
    throttle_rate: float = 0.0  # share answered 429 with a random rate-limit code
    hang_rate: float = 0.0  # share that sleep hang_s before answering
    hang_s: float = 30.0
    truncate_rate: float = 0.0  # share answered 200 with a truncated JSON body
    inspection_marker: str = "<<BLOCKED>>"
    token_factor: float = 1.0
    seed: int = 0
    batch_duration_s: float = 10.0  # a batch job's whole life cycle, compressed (api/emulator/batch.py)
    batch_fail_rate: float = 0.0  # share of batch lines answered 500 in the error file
    batch_expire_rate: float = 0.0  # share of batch jobs that expire with half their lines done
    batch_max_lines: int = 50_000  # requests per batch job

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            broken = RULES[field.name](getattr(self, field.name))
            if broken:
                raise ConfigFieldError(field.name, broken)

    def patched(self, patch: Mapping[str, Any]) -> EmulatorConfig:
        """A copy with the JSON `patch` applied; ConfigFieldError names an unknown or bad field."""
        unknown = sorted(set(patch) - set(RULES))
        if unknown:
            raise ConfigFieldError(", ".join(unknown), "not a config field")
        values = dict(patch)
        if isinstance(values.get("api_keys"), list):
            values["api_keys"] = tuple(values["api_keys"])
        return dataclasses.replace(self, **values)

    def public(self) -> dict[str, Any]:
        """The config as JSON, with every accepted API key masked."""
        return {**dataclasses.asdict(self), "api_keys": [SECRET_MASK for _ in self.api_keys]}


class ConfigFieldError(ValueError):
    """A config field breaks its rule; reads `field: rule`."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


# --- rules: each returns None when the value is fine, else the rule it breaks ---------------

Rule = Callable[[object], str | None]


def _finite(value: object) -> float | None:
    """`value` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None


def _finite_within(low: float, high: float, *, low_open: bool = False) -> Rule:
    bracket = "(" if low_open else "["
    rule = f"must be a finite number within {bracket}{low:g}, {high:g}]"

    def check(value: object) -> str | None:
        number = _finite(value)
        if number is None:
            return rule
        above_low = number > low if low_open else number >= low
        return None if above_low and number <= high else rule

    return check


def _limit(value: object) -> str | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "must be an integer >= 1 or null"


def _lines(value: object) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BATCH_LINES
    return None if ok else f"must be an integer within [1, {MAX_BATCH_LINES}]"


def _integer(value: object) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"


def _region(value: object) -> str | None:
    return None if value in REGIONS else f"must be one of {', '.join(REGIONS)}"


def _api_keys(value: object) -> str | None:
    ok = isinstance(value, (tuple, list)) and all(isinstance(k, str) and k for k in value)
    return None if ok else "must be a list of non-empty strings"


def _marker(value: object) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


_SHARE = _finite_within(0, 1)
RULES: dict[str, Rule] = {
    "region": _region,
    "api_keys": _api_keys,
    "rpm": _limit,
    "tpm": _limit,
    "rps": _limit,
    "tps": _limit,
    "latency_ms": _finite_within(0, MAX_LATENCY_MS),
    "error_rate": _SHARE,
    "throttle_rate": _SHARE,
    "hang_rate": _SHARE,
    "hang_s": _finite_within(0, MAX_HANG_S),
    "truncate_rate": _SHARE,
    "inspection_marker": _marker,
    "token_factor": _finite_within(0, MAX_TOKEN_FACTOR, low_open=True),
    "seed": _integer,
    "batch_duration_s": _finite_within(0, MAX_BATCH_DURATION_S),
    "batch_fail_rate": _SHARE,
    "batch_expire_rate": _SHARE,
    "batch_max_lines": _lines,
}
