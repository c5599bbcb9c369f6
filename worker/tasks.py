"""The Celery app and its tasks: `sidecar.ingest` (one event) and `sidecar.ingest_many` (a list).

A task validates each event, commits its desired state (or its rejection) in SQL, and
returns; the message is acknowledged after that (acks_late). A malformed event never raises.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from celery import Celery, signals

from worker.errors import InvalidEvent
from worker.events import parse_with
from worker.ledger import counters
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings
from worker.sql import documents

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's Runtime, built on first use (after fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime(Settings())
        return _runtime


def ingest_events(
    rt: Runtime, raw_events: list[Any], *, message_id: str | None = None, attempt_key: str | None = None
) -> dict[str, int]:
    """Validate and record each event in its own transaction; returns counts by outcome.

    `message_id` (the broker message's id) makes a redelivered message's version-less events
    duplicates instead of new versions; `attempt_key` is marked finished in the closing
    transaction."""
    outcomes: Counter[str] = Counter()
    coalesced: Counter[tuple[str, str]] = Counter()
    for index, raw in enumerate(raw_events):
        try:
            event = parse_with(raw, rt.settings)
        except InvalidEvent as exc:
            with rt.sessions.begin() as session:
                documents.reject(session, raw, exc.field, exc.rule)
            log.warning("event.rejected field=%s rule=%s", exc.field, exc.rule)
            outcomes["rejected"] += 1
            continue
        with rt.sessions.begin() as session:
            delivery_id = f"{message_id}:{index}" if message_id else None
            outcomes[documents.accept(session, event, coalesced, delivery_id=delivery_id)] += 1
    with rt.sessions.begin() as session:
        counters.record_outcomes(session, outcomes)
        counters.record_avoided(session, "coalesced", coalesced, model=rt.embedder.model)
        if attempt_key is not None:
            documents.message_finished(session, attempt_key)
    if outcomes["accepted"]:
        rt.wake.set()
    return dict(outcomes)


def create_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url()
    app = Celery("sidecar", broker=broker, set_as_current=False)
    # Redis emulates acks with a visibility timeout (set it everywhere it is read): a message whose
    # worker died is delivered again after it. The SQLAlchemy transport of the embedded default
    # hands its options to create_engine instead.
    redis_broker = broker.startswith(("redis://", "rediss://"))
    visibility_s = settings.broker_visibility_timeout_s
    transport: dict[str, Any] = (
        {
            "visibility_timeout": visibility_s,
            "unacked_restore_interval": max(1, visibility_s / 20),
            "unacked_restore_throttle": 1,
        }
        if redis_broker
        else {"connect_args": {"timeout": 30}}
        if broker.startswith("sqla+sqlite")
        else {}
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # fewer messages waiting out the visibility timeout after a kill
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        visibility_timeout=visibility_s,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )

    # Both take *args/**kwargs so that a call with the wrong shape is recorded as rejected
    # instead of failing inside Celery before our code runs.
    @app.task(name="sidecar.ingest", bind=True, max_retries=None)
    def ingest(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        if len(args) == 1 and not kwargs:
            return _run(self, [args[0]])
        return _run(self, [], bad_call="sidecar.ingest takes one positional argument: an event object")

    @app.task(name="sidecar.ingest_many", bind=True, max_retries=None)
    def ingest_many(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        if len(args) == 1 and not kwargs and isinstance(args[0], list):
            return _run(self, args[0])
        return _run(self, [], bad_call="sidecar.ingest_many takes one positional argument: a list of events")

    if redis_broker:  # pops that survive a killed worker (see worker/broker.py)
        app.conf.broker_transport = "worker.broker:Transport"
    return app


def _run(task: Any, events: list[Any], *, bad_call: str | None = None) -> dict[str, int]:
    try:
        rt = runtime()
        task_id = task.request.id or ""
        # Deliveries of this try that began and never finished; a retry (same id) counts afresh.
        attempt_key = f"{task_id}:{task.request.retries}"
        with rt.sessions.begin() as session:
            attempts = documents.message_started(session, attempt_key) if task_id else 1
        if attempts > rt.settings.max_attempts:
            bad_call = (
                f"the message was delivered {attempts} times and never finished "
                "(it stops the worker each time): dead-lettered"
            )
        if bad_call is not None:
            with rt.sessions.begin() as session:
                documents.reject(
                    session, {"args": task.request.args, "kwargs": task.request.kwargs}, "arguments", bad_call
                )
                documents.message_finished(session, attempt_key)
            return {"rejected": 1}
        return ingest_events(rt, events, message_id=task_id or None, attempt_key=attempt_key)
    except Exception as exc:  # SQL unavailable and the like: the same message is retried
        log.warning("ingest.retry error=%s", type(exc).__name__)
        # The countdown stays far below the visibility timeout (a longer ETA would be redelivered).
        countdown = min(2 ** min(task.request.retries, 6), task.app.conf.visibility_timeout / 4)
        raise task.retry(exc=exc, countdown=countdown)


def start_embedding(threads: int) -> None:
    """Start this process's embedding loop once the worker (or its pool child) is up."""
    from worker.service import EmbedService

    service = EmbedService(runtime(), threads=threads)
    service.start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        service.stop()
        service.rt.close()  # flushes and unlocks a local-mode Qdrant path
