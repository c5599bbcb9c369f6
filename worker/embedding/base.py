"""The embedding seam: what the pipeline asks of a provider and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

TextType = Literal["document", "query"]


@dataclass(frozen=True)
class EmbedResult:
    """One successful provider call. Vectors are in input order."""

    vectors: list[list[float]]
    billed_tokens: int
    request_id: str | None
    http_status: int = 200
    latency_ms: float = 0.0
    sparse: list[dict[int, float]] | None = field(default=None)


class Embedder(Protocol):
    """Embeds up to the model's max rows per call.

    Raises RetryLater (ProviderThrottled, ProviderUnavailable, MalformedResponse) or GiveUp
    (InputRejected, AccountError), each carrying `.call` (a CallInfo) for the ledger.
    """

    model: str
    dimensions: int
    api: str

    def embed(
        self, texts: list[str], *, text_type: TextType = "document", instruct: str | None = None
    ) -> EmbedResult: ...

    def close(self) -> None: ...
