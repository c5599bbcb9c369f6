"""Tracing: spans for accept, claim, embed (GenAI semantic conventions) and store write, into an
in-memory exporter on real parts (SQL, Qdrant, HTTP to the emulator); over OTLP/HTTP to a collector
on loopback when OTEL_EXPORTER_OTLP_ENDPOINT is set; nothing at all when it is not."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worker import pipeline, tasks, telemetry
from worker.settings import Settings
from worker.sql.models import ProviderRequest

TEXT = "a private sentence about saffron and copper"


@pytest.fixture()
def spans(make_runtime, monkeypatch):
    rt = make_runtime()
    monkeypatch.setattr(tasks, "_runtime", rt)
    monkeypatch.setattr(tasks, "_settings", rt.settings)
    exporter = InMemorySpanExporter()
    assert telemetry.configure(rt.settings, exporter=exporter)
    yield rt, exporter
    telemetry.shutdown()


def fake_task(task_id: str) -> Any:
    return SimpleNamespace(
        name="sidecar.ingest", request=SimpleNamespace(id=task_id, retries=0, args=(), kwargs={})
    )


def drain(rt) -> int:
    """Cycles until idle; returns how many found work."""
    for busy in range(50):
        if pipeline.run_cycle(rt).idle:
            return busy
    raise AssertionError("work did not drain")


def test_spans_for_accept_claim_embed_and_store_write(spans):
    rt, exporter = spans
    task = fake_task("m-1")
    events = [{"op": "upsert", "doc_id": f"d{i}", "text": f"{TEXT} {i}"} for i in range(12)]
    assert tasks._run(task, tasks._ingest_work(task, events)) == {"accepted": 12}
    busy = drain(rt)
    for _ in range(3):  # idle polls leave no claim span
        assert pipeline.run_cycle(rt).idle

    finished = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    (accept,) = by_name["sidecar.accept"]
    assert accept.attributes["messaging.message.id"] == "m-1"
    assert (
        len(by_name["sidecar.claim"]) == busy
        and by_name["sidecar.claim"][0].attributes["sidecar.documents"] == 12
    )
    writes = by_name["sidecar.store.write"]  # one per store call: a cycle's documents go together
    assert sum(span.attributes["sidecar.documents"] for span in writes) == 12
    assert by_name["sidecar.store.write"][0].attributes["db.collection.name"] == "documents"

    calls = by_name[f"embeddings {rt.embedder.model}"]
    with rt.sessions() as session:
        ledger = {r.id: r for r in session.execute(sa.select(ProviderRequest)).scalars()}
    assert len(calls) == len(ledger) == 2  # 10 rows, then 2
    for call in calls:
        a = call.attributes
        row = ledger[a["sidecar.request_id"]]
        assert call.kind is SpanKind.CLIENT
        assert a["gen_ai.operation.name"] == "embeddings"
        assert a["gen_ai.request.model"] == rt.embedder.model == row.model
        assert a["gen_ai.usage.input_tokens"] == row.billed_tokens > 0
        assert a["gen_ai.response.id"] == row.provider_request_id
        assert a["sidecar.rows"] == row.rows
    for span in finished:  # never the text of a document
        assert not any(TEXT in str(v) for v in span.attributes.values())


def test_a_failed_call_is_an_error_span_with_the_provider_answer(spans, emulator):
    rt, exporter = spans
    emulator.configure(error_rate=1.0)
    tasks.ingest_events(rt, [{"op": "upsert", "doc_id": "x", "text": TEXT}])
    pipeline.run_cycle(rt)
    (call,) = [s for s in exporter.get_finished_spans() if s.name.startswith("embeddings ")]
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes["http.response.status_code"] >= 500
    assert any(e.name == "exception" for e in call.events)


def test_tracing_is_off_and_free_without_an_endpoint(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.otel_exporter_otlp_endpoint is None
    assert telemetry.configure(settings) is False
    assert telemetry.span("a") is telemetry.span("b")  # one shared no-op: nothing allocated
    with telemetry.span("a", x=1) as span:
        span.set_attributes({"y": 2})
    docs = telemetry.claimed(lambda: [1, 2])
    assert docs == [1, 2]


class Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, int]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_spans_go_over_otlp_http_to_the_endpoint(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "sidecar-test")
        settings = Settings(_env_file=None, data_dir=tmp_path)
        assert settings.otel_service_name == "sidecar-test"
        assert telemetry.configure(settings)
        with telemetry.span("sidecar.accept"):
            pass
        telemetry.shutdown()  # flushes the batch
        assert Collector.received and Collector.received[0][:2] == ("/v1/traces", "application/x-protobuf")
    finally:
        telemetry.shutdown()
        server.shutdown()
        server.server_close()
