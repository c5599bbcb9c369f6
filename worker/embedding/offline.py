"""An Embedder for work that must call no provider (`sidecar reconcile`): no API key needed.

It names the configured model and size, so the runtime's checks and cache keys see the same
model as the worker's, and refuses to embed.
"""

from __future__ import annotations

from worker.embedding.base import EmbedResult, TextType
from worker.errors import ConfigError
from worker.settings import Settings


class OfflineEmbedder:
    """Satisfies `Embedder`; `embed` raises ConfigError."""

    api = "none"

    def __init__(self, model: str, dimensions: int) -> None:
        self.model = model
        self.dimensions = dimensions

    @classmethod
    def from_settings(cls, settings: Settings) -> OfflineEmbedder:
        return cls(settings.embedding_model, settings.embedding_dimensions)

    def embed(
        self, texts: list[str], *, text_type: TextType = "document", instruct: str | None = None
    ) -> EmbedResult:
        raise ConfigError("this command does not call the provider")

    def close(self) -> None:
        pass
