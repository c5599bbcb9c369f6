"""The runtime of another model: a collection embedded with a model other than the configured
one (after a re-embed) gets its own embedder, rate limiter (the provider limits each model
apart), spec, chunk size and budget check. Built once per process and model, kept in the
runtime's `variants`, and closed with it (worker/runtime.py)."""

from __future__ import annotations

import dataclasses
import threading

from worker import chunking
from worker.ledger import budget
from worker.runtime import Runtime, build_embedder, build_limiter

_LOCK = threading.Lock()


def model_runtime(rt: Runtime, model: str, dimensions: int) -> Runtime:
    """`rt` itself for its own model; else a runtime sharing everything but the model's parts."""
    if model == rt.embedder.model and dimensions == rt.embedder.dimensions:
        return rt
    key = ("model", model, dimensions)
    with _LOCK:
        found = rt.variants.get(key)
        if isinstance(found, Runtime):
            return found
        settings = rt.settings.model_copy(
            update={"embedding_model": model, "embedding_dimensions": dimensions}
        )
        spec = settings.model_spec()
        variant = dataclasses.replace(
            rt,
            settings=settings,
            embedder=build_embedder(settings),
            limiter=build_limiter(settings),
            spec=spec,
            chunk_max_tokens=chunking.token_limit(settings.chunk_max_tokens, spec.max_tokens_per_row),
            budget_check=budget.pipeline_check(spec, settings),
        )
        rt.variants[key] = variant
        return variant
