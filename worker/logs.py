"""The one place that configures logging: event-style lines, `name.event key=value …`.

No line carries document text or a secret. Our own lines name types and ids only; Celery's lines
that would print a task's arguments or a message body pass through `RedactTaskData`, installed on
every handler of the worker (`configure`, and Celery's logger set-up through `redact_handlers`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
REDACTED = "<redacted>"
_DATA_KEYS = ("args", "kwargs", "argsrepr", "kwargsrepr")  # keys of Celery's log contexts
# Celery's messages that dump a message body or headers: how many leading arguments stay (the error;
# for a decode error also the content type and encoding).
_BODY_DUMPS = {
    "Received and deleted unknown message": 0,
    "Received unregistered task of type": 1,
    "Received invalid task message": 1,
    "Can't decode message body": 3,
}
_TASK_LOGGERS = ("celery.app.trace", "celery.worker.request", "celery.worker.strategy")
# Celery's lines for every task received and succeeded (two per broker message, at INFO) only at
# DEBUG (or with SIDECAR_LOG_TASK_LINES): at a thousand messages a second they are noise and a
# tenth of the consumer's cost.
# Failures keep their lines (ERROR); retries have our own (`ingest.retry`, WARNING).
_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def configure(level: str = "INFO", *, task_lines: bool = False) -> None:
    """Logging for a process at `level`; `task_lines` keeps Celery's per-task lines at that level
    (SIDECAR_LOG_TASK_LINES)."""
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    chosen = logging.getLogger().level
    per_task = chosen if chosen <= logging.DEBUG or task_lines else max(chosen, logging.WARNING)
    for name in _PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(per_task)
    redact_handlers(logging.getLogger())


def redact_handlers(logger: logging.Logger) -> None:
    """Install `RedactTaskData` on each handler of `logger` (once)."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactTaskData) for f in handler.filters):
            handler.addFilter(RedactTaskData())


class RedactTaskData(logging.Filter):
    """Strip task arguments and message bodies from Celery's and kombu's records.

    Celery logs a task's context (a dict with `args`/`kwargs`, also attached as `record.data`),
    the repr of a Request (which ends with the arguments), an exception's repr (whose message
    may quote an argument) and, for messages it cannot run, the whole body. The record keeps
    its task name, id and exception type.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("celery", "kombu")):
            return True
        if isinstance(record.args, Mapping):
            record.args = _redact_context(record.args)
        elif isinstance(record.args, tuple):
            record.args = _redact_args(record.name, str(record.msg), record.args)
        data = getattr(record, "data", None)
        if isinstance(data, Mapping):
            record.data = _redact_context(data)
        return True


def _redact_context(context: Mapping[str, Any]) -> dict[str, Any]:
    clean = {k: (REDACTED if k in _DATA_KEYS else v) for k, v in context.items()}
    if isinstance(clean.get("exc"), str):
        clean["exc"] = exception_type(clean["exc"])
    return clean


def _redact_args(logger: str, message: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    for start, kept in _BODY_DUMPS.items():
        if message.startswith(start):
            return (*args[:kept], *(REDACTED for _ in args[kept:]))
    of_a_task = logger.startswith(_TASK_LOGGERS)
    return tuple(_describe(arg, of_a_task) for arg in args)


def _describe(arg: Any, of_a_task: bool) -> Any:
    """A Celery Request as its name and id; a task's exception (or Retry) as its type."""
    humaninfo = getattr(arg, "humaninfo", None)
    if callable(humaninfo):
        return humaninfo()
    if of_a_task and isinstance(arg, BaseException):
        return exception_type(repr(arg))
    return arg


def exception_type(text: str) -> str:
    """`ValueError('…')` → `ValueError`; `Retry in 2s: KeyError(…)` → `Retry in 2s: KeyError`."""
    return text.split("(", 1)[0]
