"""`sidecar capture`: run every source of the sources file, one thread each, until stopped.

The capture process needs SQL and the accept path only: its Runtime has no vector store (the
worker's embedded store stays the worker's alone) and an embedder that never calls the provider.
A source that fails (its database or Redis down, a slot gone) records the error and starts
again after a backoff (1 s doubling to 60 s); with `once`, each source drains what is there and
the run ends, failing if any source failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

from worker.capture import state
from worker.capture.postgres import PostgresCapture
from worker.capture.sources import Source
from worker.capture.streams import DebeziumCapture
from worker.embedding.offline import OfflineEmbedder
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings
from worker.vectorstore.base import VectorStore

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0


class Capture(Protocol):
    def run(self) -> None: ...


def make_capture(rt: Runtime, source: Source, *, stop: threading.Event, once: bool) -> Capture:
    if source.kind == "postgres":
        return PostgresCapture(rt, source, stop=stop, once=once)
    return DebeziumCapture(rt, source, stop=stop, once=once)


def capture_runtime(settings: Settings) -> Runtime:
    """SQL and the accept path, no vector store, no provider calls."""
    store = cast(VectorStore, DetachedStore())
    return build_runtime(settings, store=store, embedder=OfflineEmbedder.from_settings(settings))


def run_sources(
    rt: Runtime, sources: list[Source], *, stop: threading.Event, once: bool = False
) -> list[str]:
    """Run each source in its own thread until `stop` (or drained, with `once`); the failures."""
    failures: list[str] = []
    threads = [
        threading.Thread(
            target=run_source,
            args=(rt, source),
            kwargs={"stop": stop, "once": once, "failures": failures},
            name=f"capture-{source.name}",
            daemon=True,
        )
        for source in sources
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    return failures


def run_source(
    rt: Runtime,
    source: Source,
    *,
    stop: threading.Event,
    once: bool,
    failures: list[str],
    factory: Callable[..., Capture] = make_capture,
) -> None:
    backoff_s = 1.0
    while not stop.is_set():
        try:
            factory(rt, source, stop=stop, once=once).run()
            if once:
                return
            backoff_s = 1.0
        except Exception as exc:  # the source's failure: recorded, then tried again
            reason = describe_error(exc)
            log.warning("capture.failed source=%s error=%s", source.name, reason)
            try:
                with rt.sessions.begin() as session:
                    state.record_error(session, source.name, source.kind, reason)
            except Exception as again:  # SQL down too: the log has it
                log.error("capture.error_not_recorded source=%s error=%s", source.name, type(again).__name__)
            if once:
                failures.append(f"{source.name}: {reason}")
                return
        stop.wait(backoff_s)
        backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)


def describe_error(exc: BaseException) -> str:
    """The error's type and first line, without anything after a DSN-like `password=`."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "password" in first.lower():
        first = first[: first.lower().index("password")] + "…"
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


class DetachedStore:
    """The capture process's stand-in for the vector store: capture accepts changes into SQL only
    (the worker owns the store), so any use but `close` is a bug and says so."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the capture process opens no vector store (VectorStore.{name} called)")

    def close(self) -> None:
        return None
