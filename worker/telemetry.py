"""Tracing, and how a task reports a dead-lettered message to monitors.

Tracing is OpenTelemetry, on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and the optional extra
`otel` is installed (`pip install 'vector-sidecar[otel]'`); spans then go to that collector over
OTLP/HTTP. Otherwise `span` returns one shared no-op context manager: nothing is imported,
allocated or timed on the hot path. Spans:

    sidecar.accept        one broker message recorded (worker/tasks.py)
    sidecar.claim         a claim that found pending documents (worker/pipeline.py)
    embeddings <model>    one provider call, GenAI semantic conventions: gen_ai.operation.name
                          `embeddings`, gen_ai.request.model, gen_ai.usage.input_tokens (billed),
                          gen_ai.response.id (the provider's request id), sidecar.request_id (ours)
    sidecar.store.write   one document's points written to the vector store

`configure` runs once per process at its entry point (worker/tasks.py `create_celery`, which the
worker, the API and `sidecar serve` all call).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from worker.embedding.base import Embedder, EmbedResult
from worker.errors import SidecarError
from worker.settings import Settings

log = logging.getLogger(__name__)

PROVIDER = "dashscope"
T = TypeVar("T")


class SpanLike(Protocol):
    def set_attributes(self, attributes: dict[str, Any]) -> None: ...


class _NoSpan:
    """What `span` yields while tracing is off: accepts attributes and drops them."""

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        return None


_NO_SPAN = _NoSpan()
_OFF: contextlib.nullcontext[_NoSpan] = contextlib.nullcontext(_NO_SPAN)
_tracer: Any = None  # an opentelemetry Tracer once configured
_provider: Any = None  # its TracerProvider


def configure(settings: Settings, *, exporter: Any = None) -> bool:
    """Turn tracing on when an OTLP endpoint is set (or `exporter` is given, as tests do, with
    spans exported as they end); True when on. Without the `otel` extra, logs once and stays off."""
    global _tracer, _provider
    if exporter is None and not settings.otel_exporter_otlp_endpoint:
        return _tracer is not None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "telemetry.off reason=opentelemetry-sdk not installed (pip install 'vector-sidecar[otel]')"
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "telemetry.off reason=OTLP exporter not installed (pip install 'vector-sidecar[otel]')"
            )
            return False
        endpoint = f"{str(settings.otel_exporter_otlp_endpoint).rstrip('/')}/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    shutdown()
    _provider, _tracer = provider, provider.get_tracer("vector-sidecar")
    log.info("telemetry.on service=%s", settings.otel_service_name)
    return True


def shutdown() -> None:
    """Export what is pending and turn tracing off (a process's exit; tests)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[SpanLike]:
    """A span around a block, yielding it (to add attributes known at the end); the shared no-op
    while tracing is off. Attributes that are None are left out."""
    if _tracer is None:
        return _OFF
    return _started(name, {k: v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def _started(name: str, attributes: dict[str, Any]) -> Iterator[SpanLike]:
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if name.startswith("embeddings") else SpanKind.INTERNAL
    with _tracer.start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield current


def claimed(claim: Callable[..., list[T]], *args: Any, **kwargs: Any) -> list[T]:
    """`claim(*args, **kwargs)`, with a span when it found documents (idle polls leave none)."""
    if _tracer is None:
        return claim(*args, **kwargs)
    started = time.time_ns()
    docs = claim(*args, **kwargs)
    if docs:
        attributes = {"sidecar.documents": len(docs)}
        _tracer.start_span("sidecar.claim", start_time=started, attributes=attributes).end()
    return docs


def store_span(
    collection: str, points: int, documents: int = 1
) -> contextlib.AbstractContextManager[SpanLike]:
    """The span of one write to the vector store (of `documents` documents, `points` points)."""
    if _tracer is None:
        return _OFF
    attributes = {"db.collection.name": collection, "sidecar.points": points, "sidecar.documents": documents}
    return span("sidecar.store.write", **attributes)


def embedded(embedder: Embedder, texts: list[str], est_tokens: int, request_id: str) -> EmbedResult:
    """`embedder.embed(texts)` in the span of one provider call (GenAI semantic conventions),
    carrying the billed tokens and the provider's request id."""
    if _tracer is None:
        return embedder.embed(texts)
    attributes = {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": embedder.model,
        "gen_ai.embeddings.dimension.count": embedder.dimensions,
        "sidecar.request_id": request_id,
        "sidecar.rows": len(texts),
        "sidecar.est_tokens": est_tokens,
    }
    with span(f"embeddings {embedder.model}", **attributes) as current:
        try:
            result = embedder.embed(texts)
        except SidecarError as exc:
            if exc.call is not None and exc.call.request_id:
                current.set_attributes({"gen_ai.response.id": exc.call.request_id})
            if exc.call is not None and exc.call.http_status:
                current.set_attributes({"http.response.status_code": exc.call.http_status})
            raise
        current.set_attributes({"gen_ai.usage.input_tokens": result.billed_tokens})
        if result.request_id:
            current.set_attributes({"gen_ai.response.id": result.request_id})
        return result


# --- task outcomes for monitors (Flower, celery-exporter) -----------------------------------------


class DeadLettered(Exception):
    """Raised by a task whose message went to the dead letters, so monitors count it failed."""


def mark_dead_lettered(task: Any, reason: str) -> None:
    """Remember on the running task that its message is a dead letter (`reported` raises)."""
    task.request.dead_lettered = reason


def reported(task: Any, result: dict[str, int]) -> dict[str, int]:
    """The task's result, or DeadLettered when its message went to the dead letters: an
    expected failure (the tasks declare it in `throws`), acknowledged and logged without a
    traceback, which Flower and celery-exporter show as failed."""
    if reason := getattr(task.request, "dead_lettered", None):
        raise DeadLettered(reason)
    return result
