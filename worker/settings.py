"""The one settings object: SIDECAR_* environment variables (and a `.env` file).

Names are a contract (README "Configuration"). A process builds `Settings()` once, at its entry
point (the CLI command, Celery's worker start, the API's factory), and passes it down; nothing
else reads the environment. Sections: where things live, the provider, events, the pipeline,
budgets, the HTTP API and retention. Secrets are SecretStr: never printed, logged, sent through
Celery or written to the ledger (only the key's fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker import catalog
from worker.errors import ConfigError

EMBEDDED_PREFIX = "sqla+sqlite:"  # the embedded default broker: an SQLite file (worker/embedded_broker.py)
EMBED_THREADS = 6  # embedding loops per process at most (Settings.default_embed_threads)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SIDECAR_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Path(".sidecar")
    broker_url: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    qdrant_path: Path | None = None  # set: qdrant-client local mode (when no qdrant_url)
    edge_path: Path | None = None  # the embedded default store, Qdrant Edge (default data_dir/edge)
    edge_optimize_after_points: int = 10_000  # optimise an Edge collection after this many writes
    edge_optimize_idle_s: float = 5.0  # ...once the embedding threads were idle this long
    collection_prefix: str = ""

    dashscope_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DASHSCOPE_API_KEY", "SIDECAR_DASHSCOPE_API_KEY")
    )
    dashscope_url: str | None = None
    region: Literal["beijing", "singapore"] = "beijing"
    embedding_api: Literal["compatible", "native"] = "compatible"
    embedding_model: str = "text-embedding-v4"
    embedding_dimensions: int = 1024
    sparse_vectors: bool = False  # also store the native API's sparse vector (named `sparse`)
    request_timeout_s: float = 30.0

    default_collection: str = "documents"
    default_tenant: str = "default"
    max_text_bytes: int = 1 << 20
    max_metadata_bytes: int = 16 << 10
    store_text: bool = True

    chunk_max_tokens: int | None = None  # default: just under the model's max tokens per row
    chunk_overlap_tokens: int = 64

    claim_docs: int = 64  # documents claimed per cycle
    request_concurrency: int = Field(default=4, ge=1, le=32)  # provider calls a cycle keeps in flight
    lease_s: float = 120.0
    batch_max_delay_s: float = 1.0  # a lone event waits at most this long for company
    poll_interval_s: float = 0.1
    max_attempts: int = 8  # embedding attempts before a document becomes a dead letter
    account_pause_s: float = 60.0  # pause after an account-level error, then probe again
    reconcile_interval_s: float = 60.0  # 0 turns the periodic reconciler off
    search_cache_size: int = 1024  # query embeddings kept in memory (LRU); 0 turns the cache off

    requests_per_minute: int | None = None  # default: the model's limit in the region
    tokens_per_minute: int | None = None

    worker_concurrency: int = 4
    ingest_gather_s: float = Field(default=0.005, ge=0, le=0.1)  # streaming messages wait for company
    ingest_retries: int = 40  # a message meeting SQL or the broker down is retried this often, backing off
    broker_visibility_timeout_s: float = 300.0  # Redis: redeliver a dead worker's unacked message after this
    log_level: str = "INFO"
    log_task_lines: bool = False  # Celery's line per task received and succeeded, at INFO too

    # --- budgets (SIDECAR_BUDGET_*): caps in CNY; per collection as "docs=1.5,faq=0.2" or JSON ---
    budget_daily_cny: Decimal | None = None
    budget_monthly_cny: Decimal | None = None
    budget_collection_daily_cny: Annotated[dict[str, Decimal], NoDecode] = {}
    budget_collection_monthly_cny: Annotated[dict[str, Decimal], NoDecode] = {}

    # --- HTTP API (SIDECAR_API_*): comma-separated bearer tokens, request caps ---
    api_tokens: Annotated[list[SecretStr], NoDecode] = []
    api_read_tokens: Annotated[list[SecretStr], NoDecode] = []
    api_max_body_bytes: int = 32 << 20
    api_max_events: int = 10_000

    # --- retention of bookkeeping (days; 0 keeps forever) ---
    retention_seen_events_days: float = 7.0  # event_id idempotency window
    retention_rejected_days: float = 30.0  # rejected_events rows
    retention_attempts_days: float = 2.0  # message_attempts rows of finished or abandoned messages
    retention_cache_days: float = 90.0  # embedding cache entries not used for this long
    retention_backlog_days: float = 7.0  # backlog_samples minutes (the console's backlog history)

    # --- change capture (SIDECAR_CAPTURE_*; worker/capture/) ---
    capture_snapshot_lane: Literal["batch", "realtime"] = "batch"  # lane of snapshot and resync rows
    capture_batch_rows: int = Field(default=500, ge=1)  # changes committed (and acknowledged) together
    capture_max_lag_s: float = 300.0  # /readyz: a source further behind than this is not ready
    capture_max_lag_bytes: int = 1 << 30  # /readyz: a slot holding more WAL than this is not ready
    capture_claim_idle_s: float = 60.0  # debezium: take over entries another consumer held this long
    capture_idle_s: float = 1.0  # how long an idle source waits for changes before looking again

    # --- batch lane and re-embedding (SIDECAR_BATCH_*, SIDECAR_REEMBED_*) ---
    batch_enabled: bool = True  # false: documents sent with lane "batch" go the real-time way
    batch_poll_interval_s: float = 60.0  # how often a batch job's status is asked for
    batch_max_lines: int = 50_000  # lines per batch job (the provider's limit is 50,000)
    batch_collect_s: float = 60.0  # the oldest waiting batch document waits this long for company
    batch_completion_window: str = "24h"  # asked of the provider: 24h to 336h ("14d")
    reembed_route_refresh_s: float = 1.0  # how stale a process's view of collection routes may be
    reembed_settle_s: float = 3.0  # after a route changes, wait this long before the store follows
    reembed_follow_interval_s: float = 2.0  # a caught-up migration is looked at again after this

    # --- console and telemetry (SIDECAR_CONSOLE_*, OTEL_*) ---
    # Tracing (worker/telemetry.py): on when an OTLP/HTTP collector is named; the standard names.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otel_service_name: str = Field(
        default="vector-sidecar", validation_alias=AliasChoices("OTEL_SERVICE_NAME")
    )

    @field_validator("api_tokens", "api_read_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("budget_collection_daily_cny", "budget_collection_monthly_cny", mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value:
            return {}
        if value.startswith("{"):
            return {k: str(v) for k, v in json.loads(value).items()}
        pairs = {}
        for part in value.split(","):
            name, sep, amount = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{part!r} is not collection=amount")
            pairs[name.strip()] = amount.strip()
        return pairs

    @field_validator("budget_daily_cny", "budget_monthly_cny")
    @classmethod
    def _not_negative(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value < 0:
            raise ValueError("a cap cannot be negative")
        return value

    @field_validator("dashscope_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    # --- derived values -------------------------------------------------------------------

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"{EMBEDDED_PREFIX}///{(self.data_dir / 'broker.sqlite').resolve()}"

    def default_embed_threads(self) -> int:
        """Embedding loops per process when the command line names none: at most 6, of which
        only as many work as a backlog behind the provider's latency needs (worker/loops.py): one
        while the process keeps up; at the Singapore v3 limits two workers reach 0.94 of the
        ceiling with 5 or 6, 0.83 with 3."""
        return EMBED_THREADS

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sidecar.sqlite').resolve()}"

    def resolved_qdrant_path(self) -> Path | None:
        """Local mode only when asked for: no default path."""
        return self.qdrant_path

    def resolved_edge_path(self) -> Path:
        return self.edge_path or self.data_dir / "edge"

    def provider_root(self) -> str:
        return self.dashscope_url or catalog.REGION_URLS[self.region]

    def model_spec(self) -> catalog.ModelSpec:
        """The model spec, after checking the model can serve the configured size and region."""
        spec = catalog.check_serving(self.embedding_model, self.embedding_dimensions, self.region)
        if self.sparse_vectors and (self.embedding_api != "native" or not spec.sparse):
            raise ConfigError(
                "SIDECAR_SPARSE_VECTORS=true needs SIDECAR_EMBEDDING_API=native and a model with "
                f"sparse output (text-embedding-v3 or v4), not {self.embedding_api}/{spec.name}"
            )
        return spec

    def rate_limits(self) -> catalog.RateLimits:
        spec = self.model_spec()
        base = spec.rate_limits[self.region]
        return catalog.RateLimits(
            requests_per_minute=self.requests_per_minute or base.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute or base.tokens_per_minute,
        )

    def key_fingerprint(self) -> str | None:
        """A short, non-reversible id of the API key, safe to store and show."""
        if self.dashscope_api_key is None:
            return None
        digest = hashlib.sha256(self.dashscope_api_key.get_secret_value().encode()).hexdigest()
        return f"sha256:{digest[:12]}"
