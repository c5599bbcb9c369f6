"""The redaction filter on Celery's log records: task arguments and message bodies never print.

The records are built as Celery builds them (celery/app/trace.py, celery/worker/request.py,
celery/worker/consumer/consumer.py); the end-to-end check is in tests/test_worker_process.py.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from celery.app import trace
from celery.worker.consumer import consumer

from worker import logs

MARKER = "secret tea leaves"


class FakeRequest:
    """What Celery's Request shows: `humaninfo()`, and a repr that ends with the arguments."""

    def humaninfo(self) -> str:
        return "sidecar.ingest[abc]"

    def __repr__(self) -> str:
        return f"<Request: sidecar.ingest[abc] ({MARKER!r},) {{}}>"


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    # Celery's per-task lines are DEBUG-only once logs.configure ran (another test may have run
    # it); here every INFO record goes through the redaction
    per_task = {name: logging.getLogger(name).level for name in logs._PER_TASK_LOGGERS}
    for name in per_task:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logs.redact_handlers(root)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)
    for name, level in per_task.items():
        logging.getLogger(name).setLevel(level)


def test_celery_records_lose_arguments_bodies_and_exception_text(captured: io.StringIO) -> None:
    context = {
        "id": "abc",
        "name": "sidecar.ingest",
        "args": f"({MARKER!r},)",
        "kwargs": "{}",
        "exc": f"ValueError({MARKER!r})",
        "description": "raised unexpected",
    }
    log = logging.getLogger("celery.app.trace")
    log.info(trace.LOG_FAILURE + " %(args)s %(kwargs)s", context, extra={"data": dict(context)})
    log.info("Task %s[%s] retry: %s", "sidecar.ingest", "abc", ValueError(MARKER))
    logging.getLogger("celery.worker.consumer.consumer").warning(
        "Failed to cancel active request %r after connection loss", FakeRequest()
    )
    logging.getLogger("celery.worker.consumer.consumer").error(
        consumer.UNKNOWN_TASK_ERROR,
        KeyError("sidecar.nope"),
        f"[[{MARKER!r}], {{}}]",
        {"argsrepr": MARKER},
        {},
    )
    logging.getLogger("celery.worker.consumer.consumer").warning(consumer.UNKNOWN_FORMAT, f"body: {MARKER!r}")
    text = captured.getvalue()
    assert MARKER not in text
    assert "Task sidecar.ingest[abc] raised unexpected: ValueError" in text
    assert "Failed to cancel active request 'sidecar.ingest[abc]' after connection loss" in text
    assert "Received unregistered task of type 'sidecar.nope'" in text


def test_other_records_are_untouched(captured: io.StringIO) -> None:
    logging.getLogger("worker.pipeline").info("embed.done rows=%d note=%s", 3, MARKER)
    logging.getLogger("celery.worker.consumer.connection").info("Connected to %s", "redis://h:6379/0")
    assert f"embed.done rows=3 note={MARKER}" in captured.getvalue()
    assert "Connected to redis://h:6379/0" in captured.getvalue()


def test_the_filter_is_installed_once() -> None:
    logger = logging.getLogger("sidecar-test-once")
    logger.addHandler(logging.NullHandler())
    logs.redact_handlers(logger)
    logs.redact_handlers(logger)
    assert sum(isinstance(f, logs.RedactTaskData) for f in logger.handlers[0].filters) == 1


def test_celerys_per_task_lines_only_at_debug() -> None:
    """At INFO a worker logs no line per task received or succeeded (two per message); failures
    (ERROR) still show; at DEBUG, or with SIDECAR_LOG_TASK_LINES, the per-task lines are back."""
    root = logging.getLogger()
    old = root.level, list(root.handlers), {n: logging.getLogger(n).level for n in logs._PER_TASK_LOGGERS}
    try:
        logs.configure("INFO")
        trace_log = logging.getLogger("celery.app.trace")
        assert not trace_log.isEnabledFor(logging.INFO)
        assert not logging.getLogger("celery.worker.strategy").isEnabledFor(logging.INFO)
        assert trace_log.isEnabledFor(logging.ERROR)
        logs.configure("DEBUG")
        assert trace_log.isEnabledFor(logging.INFO)
        logs.configure("INFO", task_lines=True)  # SIDECAR_LOG_TASK_LINES
        assert trace_log.isEnabledFor(logging.INFO) and not trace_log.isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(old[0])
        root.handlers[:] = old[1]
        for name, level in old[2].items():
            logging.getLogger(name).setLevel(level)
