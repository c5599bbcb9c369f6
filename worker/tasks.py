"""The Celery app and its tasks: `sidecar.ingest` (one event), `sidecar.ingest_many` (a list) and
`sidecar.undeliverable` (a broker entry the transport could not decode, see worker/broker.py).

A task validates each event, commits its desired state (or its rejection) in SQL, and returns;
the message is acknowledged after that (acks_late). Nothing is retried forever:

- SQL or the broker unreachable: the message is retried with backoff and jitter, at most
  `ingest_retries` times (events already committed come back as duplicates);
- anything else failing on one event rejects that event (field `event`, rule: the exception's
  type) and the rest of the message goes on;
- anything else failing outside one event (or while recording a rejection) is retried at most
  `max_attempts` times, then the message is dead-lettered as one `rejected_events` row, as is a
  message whose deliveries keep stopping the worker.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from worker import logs, telemetry, tokens
from worker.events import escape_unstorable
from worker.intake import TRANSIENT, ingest_events
from worker.ledger import counters
from worker.runtime import Runtime, build_runtime
from worker.settings import EMBEDDED_PREFIX, Settings
from worker.sql import attempts, documents, engines

log = logging.getLogger(__name__)

MAX_RAW_CHARS = 4096
Work = Callable[[Runtime, str | None], dict[str, int]]

_settings: Settings | None = None  # given to create_celery by the process's entry point
_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's Runtime, built on first use (after fork) from the settings of create_celery."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime(_app_settings())
        return _runtime


def use_runtime(rt: Runtime) -> None:
    """Make `rt` this process's Runtime: `sidecar serve` runs the consumer, the embedding threads and
    the HTTP API over one Runtime (one store handle), built before the consumer starts."""
    global _settings, _runtime
    with _runtime_lock:
        _settings = rt.settings
        _runtime = rt


def _app_settings() -> Settings:
    if _settings is None:
        raise RuntimeError("create_celery(settings) must run before a task")
    return _settings


# --- recording events (worker/intake.py) -------------------------------------------------------


def record_undeliverable(rt: Runtime, description: Any, attempt_key: str | None = None) -> dict[str, int]:
    """A broker entry that was no task message, as the transport described it
    ({"queue", "raw", "reason"}): one `rejected_events` row, field `message`."""
    given = description if isinstance(description, dict) else {}
    raw, reason, queue = given.get("raw"), given.get("reason"), given.get("queue")
    with rt.sessions.begin() as session:
        documents.reject_message(
            session,
            raw if isinstance(raw, str) else repr(description)[:MAX_RAW_CHARS],
            reason if isinstance(reason, str) and reason else "undeliverable (no reason given)",
        )
        counters.record_outcomes(session, {"rejected": 1})
        if attempt_key is not None:
            attempts.message_finished(session, attempt_key)
    log.warning("message.undeliverable queue=%s", escape_unstorable(str(queue), 64))
    return {"rejected": 1}


# --- the Celery app -------------------------------------------------------------------------------


def create_celery(settings: Settings) -> Celery:
    global _settings
    _settings = settings
    telemetry.configure(settings)
    broker = settings.resolved_broker_url()
    app = _celery_app(broker)
    # Redis emulates acks with a visibility timeout (set it everywhere it is read): a message whose
    # worker died is delivered again after it. The SQLAlchemy transport of the embedded default
    # hands its options to create_engine instead.
    redis_broker = broker.startswith(("redis://", "rediss://"))
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
        broker_transport_options=_transport_options(settings, redis_broker),
        visibility_timeout=settings.broker_visibility_timeout_s,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,  # task events for Flower and celery-exporter
        task_send_sent_event=True,
        worker_consumer="worker.consumer:Consumer",  # task events published in bunches
    )
    _register_tasks(app, max_retries=max(settings.ingest_retries, settings.max_attempts))
    _connect_signals()
    if redis_broker:  # pops that survive a killed worker (see worker/broker.py)
        app.conf.broker_transport = "worker.broker:Transport"
    return app


def _celery_app(broker: str) -> Celery:
    """The app on `broker`; the embedded SQLite broker through worker/embedded_broker.py (a URL's
    `sqla+` prefix would pick kombu's own transport whatever the app's `broker_transport`)."""
    if broker.startswith(EMBEDDED_PREFIX):
        app = Celery("sidecar", broker=broker.removeprefix("sqla+"), set_as_current=False)
        app.conf.broker_transport = "worker.embedded_broker:Transport"
        return app
    return Celery("sidecar", broker=broker, set_as_current=False)


def _transport_options(settings: Settings, redis_broker: bool) -> dict[str, Any]:
    visibility_s = settings.broker_visibility_timeout_s
    if redis_broker:
        return {
            "visibility_timeout": visibility_s,
            "unacked_restore_interval": max(1, visibility_s / 20),
            "unacked_restore_throttle": 1,
        }
    if settings.resolved_broker_url().startswith(EMBEDDED_PREFIX):
        return {"connect_args": {"timeout": 30}}
    return {}


def _register_tasks(app: Celery, *, max_retries: int) -> None:
    # Each takes *args/**kwargs so that a call of the wrong shape is recorded as rejected instead
    # of failing inside Celery before our code runs. Not shared: each app has its own tasks, so a
    # process with two apps (`sidecar serve`: the consumer's and the API's) registers each once.
    failing = {"throws": (telemetry.DeadLettered,)}  # a dead letter: failed for monitors, no traceback

    @app.task(name="sidecar.ingest", bind=True, shared=False, max_retries=max_retries, **failing)  # type: ignore[untyped-decorator]
    def ingest(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        if len(args) == 1 and not kwargs:
            return telemetry.reported(self, _run(self, _ingest_work(self, [args[0]])))
        reason = "sidecar.ingest takes one positional argument: an event object"
        return telemetry.reported(self, _run(self, _bad_call(self, reason)))

    @app.task(name="sidecar.ingest_many", bind=True, shared=False, max_retries=max_retries, **failing)  # type: ignore[untyped-decorator]
    def ingest_many(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        if len(args) == 1 and not kwargs and isinstance(args[0], list):
            return telemetry.reported(self, _run(self, _ingest_work(self, args[0])))
        reason = "sidecar.ingest_many takes one positional argument: a list of events"
        return telemetry.reported(self, _run(self, _bad_call(self, reason)))

    @app.task(name="sidecar.undeliverable", bind=True, shared=False, max_retries=max_retries)  # type: ignore[untyped-decorator]
    def undeliverable(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        description = args[0] if len(args) == 1 and not kwargs else {"raw": repr((args, kwargs))}
        return _run(self, lambda rt, key: record_undeliverable(rt, description, key))


def _ingest_work(task: Any, events: list[Any]) -> Work:
    return lambda rt, key: ingest_events(rt, events, message_id=task.request.id or None, attempt_key=key)


def _bad_call(task: Any, reason: str) -> Work:
    return lambda rt, key: _dead_letter(rt, task, key, "arguments", reason)


# --- running a task: attempts, retries, dead letters ---------------------------------------------


def _run(task: Any, work: Work) -> dict[str, int]:
    settings = _app_settings()
    try:
        rt = runtime()
        # Only a redelivery writes an attempt row (and so has one to end); a retry (same id)
        # counts its deliveries afresh.
        key = f"{task.request.id}:{task.request.retries}" if task.request.id and redelivered(task) else None
        started = 1
        if key is not None:
            with rt.sessions.begin() as session:
                started = attempts.message_started(session, key, first=2)
        if started > settings.max_attempts:
            reason = (
                f"the message was delivered {started} times and never finished "
                "(it stops the worker each time): dead-lettered"
            )
            return _dead_letter(rt, task, key, "arguments", reason)
        with telemetry.span("sidecar.accept", **{"messaging.message.id": task.request.id}):
            return work(rt, key)
    except TRANSIENT as exc:
        return _retry(task, exc, limit=settings.ingest_retries)
    except Exception as exc:  # a bug, or data SQL refused even as a rejection
        return _retry(task, exc, limit=settings.max_attempts)


def redelivered(task: Any) -> bool:
    """Whether the broker delivered this message before without an ack: a worker died holding it
    (kombu's Redis transport marks what its visibility timeout restores). Only such a delivery
    writes an attempt row before its work: a first delivery that kills the worker comes back
    marked, and counts as its second (so does the embedded SQLite broker's, worker/embedded_broker.py)."""
    info = getattr(task.request, "delivery_info", None)
    return isinstance(info, dict) and bool(info.get("redelivered"))


def _retry(task: Any, exc: Exception, *, limit: int) -> dict[str, int]:
    """Retry the message later (backoff with jitter), or dead-letter it once `limit` retries are spent."""
    retries = task.request.retries
    if retries >= limit:
        return _give_up(task, exc)
    # The countdown stays far below the visibility timeout (a longer ETA would be redelivered).
    countdown = backoff_s(retries, cap_s=task.app.conf.visibility_timeout / 4)
    log.warning(
        "ingest.retry task=%s error=%s retries=%d countdown_s=%.1f",
        task.name,
        type(exc).__name__,
        retries,
        countdown,
    )
    raise task.retry(countdown=countdown) from None


def backoff_s(retries: int, *, cap_s: float) -> float:
    """Exponential backoff, capped, with jitter (half to all of it) so retries do not stampede."""
    return min(2.0 ** min(retries, 16), cap_s) * random.uniform(0.5, 1.0)


def _give_up(task: Any, exc: Exception) -> dict[str, int]:
    reason = f"{type(exc).__name__} after {task.request.retries + 1} tries: dead-lettered"
    try:
        rt = runtime()
        return _dead_letter(rt, task, None, "message", reason)
    except Exception as again:  # nowhere left to record it
        log.error(
            "ingest.dropped task=%s error=%s then=%s (not recorded anywhere)",
            task.name,
            type(exc).__name__,
            type(again).__name__,
        )
        return {"dropped": 1}


def _dead_letter(rt: Runtime, task: Any, key: str | None, field: str, reason: str) -> dict[str, int]:
    """The whole message as one rejection row (its arguments, escaped and capped)."""
    with rt.sessions.begin() as session:
        documents.reject(session, {"args": task.request.args, "kwargs": task.request.kwargs}, field, reason)
        counters.record_outcomes(session, {"rejected": 1})
        if key is not None:
            attempts.message_finished(session, key)
    log.warning("message.dead_lettered task=%s field=%s", task.name, field)
    telemetry.mark_dead_lettered(task, reason)
    return {"rejected": 1}


# --- signals: logging, messages Celery discards, the embedding loop ------------------------------


def _connect_signals() -> None:
    """Once per process, whatever the number of apps (dispatch_uid)."""
    for signal in (signals.after_setup_logger, signals.after_setup_task_logger):
        signal.connect(_redact_logger, weak=False, dispatch_uid=f"sidecar.redact.{signal.name}")
    signals.task_unknown.connect(_record_unknown_task, weak=False, dispatch_uid="sidecar.unknown_task")
    signals.task_rejected.connect(_record_rejected_message, weak=False, dispatch_uid="sidecar.rejected")


def _redact_logger(logger: logging.Logger, **_: Any) -> None:
    logs.redact_handlers(logger)


def _record_unknown_task(message: Any, name: str, **_: Any) -> None:
    """A message for a task this worker does not have: Celery discards it; keep it as a rejection."""
    _record_discarded(message, f"unregistered task {name!r}")


def _record_rejected_message(message: Any, exc: BaseException | None = None, **_: Any) -> None:
    """A message Celery cannot run (no task header, or an invalid task message): kept likewise."""
    reason = "not a task message" if exc is None else f"invalid task message ({type(exc).__name__})"
    _record_discarded(message, reason)


def _record_discarded(message: Any, reason: str) -> None:
    """One `rejected_events` row (field `message`) for a message Celery discards before any task.

    Runs in the consumer (no pool child), so it uses an engine of its own rather than a Runtime."""
    raw = message.body
    body = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "backslashreplace")
    engine = engines.make_engine(_app_settings().resolved_database_url())
    try:
        with engines.make_sessionmaker(engine).begin() as session:
            documents.reject_message(session, body, reason)
            counters.record_outcomes(session, {"rejected": 1})
    except Exception as exc:  # Celery has logged and discarded it already
        log.error("message.discarded not recorded: %s", type(exc).__name__)
    finally:
        engine.dispose()
    log.warning("message.discarded reason=%s", escape_unstorable(reason, 200))


def start_embedding(threads: int) -> None:
    """Start this process's embedding loop once the worker (or its pool child) is up."""
    from worker.service import EmbedService

    tokens.encoding()  # the Qwen BPE (~0.85 CPU-s), loaded now rather than in the first cycle
    service = EmbedService(runtime(), threads=threads)
    service.start()

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stop(**_: Any) -> None:
        service.stop()
        service.rt.close()  # flushes and unlocks a local-mode Qdrant path
