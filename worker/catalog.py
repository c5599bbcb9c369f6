"""The provider's model table: sizes, row and token limits, prices and rate limits.

Facts from the provider's model, pricing and rate-limit pages. Prices are CNY per 1K tokens
(China site); the ledger prices every request with these, whatever the region. Money is written
for machines by `cny_str` (nano-CNY to a plain decimal string) and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

from worker.errors import ConfigError

REGION_URLS = {
    "beijing": "https://dashscope.aliyuncs.com",
    "singapore": "https://dashscope-intl.aliyuncs.com",
}
COMPATIBLE_PATH = "/compatible-mode/v1/embeddings"
NATIVE_PATH = "/api/v1/services/embeddings/text-embedding/text-embedding"
API_PATHS = {"compatible": COMPATIBLE_PATH, "native": NATIVE_PATH}


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int
    tokens_per_minute: int

    @property
    def requests_per_second(self) -> float:
        return self.requests_per_minute / 60

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_minute / 60


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dimensions: tuple[int, ...]
    default_dimensions: int
    max_rows: int
    max_tokens_per_row: int
    cny_per_1k_tokens: Decimal
    batch_cny_per_1k_tokens: Decimal
    regions: tuple[str, ...]
    sparse: bool
    instruct: bool
    rate_limits: dict[str, RateLimits]

    def cost_cny(self, tokens: int, *, batch: bool = False) -> Decimal:
        """Exact CNY cost of `tokens` billed tokens (Decimal, never float)."""
        price = self.batch_cny_per_1k_tokens if batch else self.cny_per_1k_tokens
        return Decimal(tokens) * price / Decimal(1000)

    def cost_nano_cny(self, tokens: int, *, batch: bool = False) -> int:
        """The same cost in integer nano-CNY, the ledger's unit."""
        return to_nano(self.cost_cny(tokens, batch=batch))


NANO = Decimal("1e9")


def to_nano(cny: Decimal) -> int:
    nano = cny * NANO
    if nano != nano.to_integral_value():
        raise ValueError(f"{cny} CNY is not a whole number of nano-CNY")
    return int(nano)


def from_nano(nano: int) -> Decimal:
    return (Decimal(nano) / NANO).quantize(Decimal("1e-9"))


def cny_str(nano: int) -> str:
    """Nano-CNY as a plain decimal string ("0.000000500"), never in exponent form."""
    return format(from_nano(nano), "f")


_BEIJING = RateLimits(requests_per_minute=1_800, tokens_per_minute=1_200_000)

_V1 = ModelSpec(
    name="text-embedding-v1",
    dimensions=(1536,),
    default_dimensions=1536,
    max_rows=25,
    max_tokens_per_row=2048,
    cny_per_1k_tokens=Decimal("0.0007"),
    batch_cny_per_1k_tokens=Decimal("0.00035"),
    regions=("beijing",),
    sparse=False,
    instruct=False,
    rate_limits={"beijing": _BEIJING},
)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _V1,
        replace(_V1, name="text-embedding-v2"),  # same limits and prices as v1
        ModelSpec(
            name="text-embedding-v3",
            dimensions=(1024, 768, 512),
            default_dimensions=1024,
            max_rows=10,
            max_tokens_per_row=8192,
            cny_per_1k_tokens=Decimal("0.0005"),
            batch_cny_per_1k_tokens=Decimal("0.00025"),
            regions=("beijing", "singapore"),
            sparse=True,
            instruct=False,
            rate_limits={
                "beijing": _BEIJING,
                "singapore": RateLimits(requests_per_minute=6_000, tokens_per_minute=24_000_000),
            },
        ),
        ModelSpec(
            name="text-embedding-v4",
            dimensions=(2048, 1536, 1024, 768, 512, 256, 128, 64),
            default_dimensions=1024,
            max_rows=10,
            max_tokens_per_row=8192,
            cny_per_1k_tokens=Decimal("0.0005"),
            batch_cny_per_1k_tokens=Decimal("0.00025"),
            regions=("beijing", "singapore"),
            sparse=True,
            instruct=True,
            rate_limits={
                "beijing": _BEIJING,
                "singapore": RateLimits(requests_per_minute=1_800, tokens_per_minute=1_000_000),
            },
        ),
    )
}


def get_model(name: str, *, setting: str = "SIDECAR_EMBEDDING_MODEL") -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise ConfigError(f"{setting}={name!r} is not a known model; use one of: {known}") from None


def check_serving(model: str, dimensions: int, region: str) -> ModelSpec:
    """The spec of `model` if it can serve `dimensions` in `region`, else a ConfigError naming the setting."""
    spec = get_model(model)
    if region not in REGION_URLS:
        raise ConfigError(f"SIDECAR_REGION={region!r} is not a region; use beijing or singapore")
    if region not in spec.regions:
        raise ConfigError(
            f"SIDECAR_EMBEDDING_MODEL={model!r} is not served in SIDECAR_REGION={region!r}; "
            f"it is served in: {', '.join(spec.regions)}"
        )
    if dimensions not in spec.dimensions:
        allowed = ", ".join(str(d) for d in spec.dimensions)
        raise ConfigError(
            f"SIDECAR_EMBEDDING_DIMENSIONS={dimensions} is not offered by {model}; allowed: {allowed}"
        )
    return spec
