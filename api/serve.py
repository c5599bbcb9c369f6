"""`sidecar serve`: the worker, its embedding threads, the HTTP API and, when asked or when no
provider key is set, the DashScope emulator, in one process over ONE Runtime (one store handle:
an embedded store opens in one process only).

Start, each part printing one line with its address: the emulator (api/emulator/runner.py); the
schema, upgraded first when `migrate` says so (by default only on the embedded SQLite database),
else checked as the worker checks it; the Runtime (worker/runtime.py), handed to the tasks with
`tasks.use_runtime`; the embedding threads (worker/service.py); the Celery consumer on a thread
pool (worker/tasks.py), in a thread of its own; uvicorn serving api/app.py in another.

Stop, on SIGINT or SIGTERM: HTTP stops accepting and finishes its requests; the consumer shuts
down warm (running ingest tasks finish and are acked, prefetched messages go back to the broker
as late acks provide); the embedding threads stop; the Runtime closes; then the emulator. The
exit code is 0. A second signal exits at once (128 + the signal's number).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from api.emulator import EmulatorConfig, start_in_thread
from worker import tasks
from worker.errors import ConfigError
from worker.runtime import Runtime, build_runtime
from worker.service import EmbedService
from worker.settings import Settings
from worker.sql import engines, schema

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

EMULATOR_KEY = "sk-emulator"
START_TIMEOUT_S = 60.0
HTTP_GRACE_S = 10  # uvicorn's wait for open requests after it stops accepting
CONSUMER_STOP_S = 120.0  # running ingest tasks are short; a stuck one must not hang the exit


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    embed_threads: int = 2
    concurrency: int = 4
    loglevel: str = "INFO"
    emulator: bool = False  # also when no DASHSCOPE_API_KEY is set
    migrate: bool | None = None  # None: upgrade first only on the embedded default SQLite database


class Shutdown:
    """SIGINT and SIGTERM: the first asks for an orderly stop, a second exits at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            os.write(2, b"sidecar serve: second signal, exiting now\n")
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.requested.set()


def say(line: str) -> None:
    print(line, flush=True)


def run(settings: Settings, options: ServeOptions) -> int:
    """Serve until a signal (0) or until a part stops on its own (1)."""
    shutdown = Shutdown()
    shutdown.install()
    try:
        with ExitStack() as stack:
            sock = listening_socket(options.host, options.port)
            stack.callback(sock.close)
            settings = start_emulator(settings, options, stack)
            prepare_schema(settings, options.migrate)
            rt = build_runtime(settings)
            stack.callback(timed, "store", rt.close)
            tasks.use_runtime(rt)
            say(f"store    : {describe_store(settings)}")
            start_embedding(rt, options, stack)
            threads = [start_consumer(settings, options, stack)]
            threads.append(start_http(rt, sock, options, stack))
            say(f"sidecar serve: ready (pid {os.getpid()}); SIGINT or SIGTERM stops it")
            code = wait(shutdown, threads)
            say("sidecar serve: stopping (HTTP, consumer, embedding threads, store)")
        say("sidecar serve: stopped")
        return code
    finally:
        shutdown.restore()


def wait(shutdown: Shutdown, threads: list[threading.Thread]) -> int:
    """0 once a signal asks to stop; 1 as soon as a part's thread ends on its own."""
    while not shutdown.requested.wait(0.5):
        for thread in threads:
            if not thread.is_alive():
                log.error("serve.part_stopped part=%s", thread.name)
                say(f"sidecar serve: {thread.name} stopped unexpectedly; shutting down")
                return 1
    say(f"sidecar serve: {shutdown.signal_name} received (send another to exit at once)")
    return 0


# --- the parts ------------------------------------------------------------------------------


def start_emulator(settings: Settings, options: ServeOptions, stack: ExitStack) -> Settings:
    """`settings` pointed at a bundled emulator when asked or when no key is set; else unchanged."""
    if not options.emulator and settings.dashscope_api_key is not None:
        say(f"provider : DashScope at {settings.provider_root()} (DASHSCOPE_API_KEY is set: billed)")
        return settings
    emulator = start_in_thread(EmulatorConfig(api_keys=(EMULATOR_KEY,)))
    stack.callback(emulator.stop)
    why = "--emulator" if options.emulator else "no DASHSCOPE_API_KEY set"
    say(f"provider : EMULATED by the bundled DashScope emulator at {emulator.url} ({why}; nothing is billed)")
    update: dict[str, Any] = {"dashscope_api_key": SecretStr(EMULATOR_KEY), "dashscope_url": emulator.url}
    return settings.model_copy(update=update)


def prepare_schema(settings: Settings, migrate: bool | None) -> None:
    """Upgrade the schema first if `migrate` (None: only the embedded default SQLite file), then
    refuse to start unless it is at the head revision (SchemaOutdated)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    upgrade = settings.database_url is None if migrate is None else migrate
    if upgrade:
        schema.upgrade(url)
    engine = engines.make_engine(url)
    try:
        schema.check_schema(engine)
        revision = schema.current_revision(engine)
    finally:
        engine.dispose()
    done = "upgraded to" if upgrade else "at"
    say(f"database : {safe_url(url)} (schema {done} revision {revision})")


def listening_socket(host: str, port: int) -> socket.socket:
    """The API's socket, bound before anything slow starts: a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick --port") from None
    return sock


def start_embedding(rt: Runtime, options: ServeOptions, stack: ExitStack) -> None:
    service = EmbedService(rt, threads=options.embed_threads)
    service.start()
    stack.callback(timed, "embedding", service.stop)
    say(
        f"embedding: {options.embed_threads} threads, {rt.embedder.model}/{rt.embedder.dimensions} "
        f"({rt.settings.embedding_api} API)"
    )


def start_consumer(settings: Settings, options: ServeOptions, stack: ExitStack) -> threading.Thread:
    """The Celery consumer (threads pool) on a thread; its tasks use the Runtime given to the tasks."""
    from celery.app import trace

    app = tasks.create_celery(settings)
    hostname = f"sidecar-serve@{socket.gethostname()}"
    # As `celery worker` does: the pool's threads find the tasks through the current app.
    trace.setup_worker_optimizations(app, hostname)
    ready = threading.Event()
    controller = app.WorkController(
        hostname=hostname,
        pool_cls="threads",
        concurrency=options.concurrency,
        loglevel=options.loglevel.upper(),
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        ready_callback=lambda _consumer: ready.set(),
    )
    thread = threading.Thread(target=controller.start, name="celery consumer", daemon=True)
    thread.start()
    stack.callback(timed, "consumer", stop_consumer, thread)
    wait_started(ready.is_set, thread)
    say(
        f"worker   : consuming sidecar.ingest, sidecar.ingest_many from "
        f"{safe_url(settings.resolved_broker_url())} (threads pool, {options.concurrency} slots)"
    )
    return thread


def stop_consumer(thread: threading.Thread) -> None:
    """A warm shutdown, as Celery's own SIGTERM handler asks for it (the consumer loop checks)."""
    from celery.worker import state

    state.should_stop = 0  # EX_OK
    thread.join(CONSUMER_STOP_S)
    if thread.is_alive():
        log.error("serve.consumer_not_stopped after_s=%.0f", CONSUMER_STOP_S)


def start_http(rt: Runtime, sock: socket.socket, options: ServeOptions, stack: ExitStack) -> threading.Thread:
    """uvicorn serving the API on `sock`, in a thread (uvicorn installs no signal handler there)."""
    import uvicorn

    from api.app import create_app

    config = uvicorn.Config(
        create_app(rt.settings, runtime=rt),
        log_config=None,  # the process's logging (worker/logs.py) stays as configured
        access_log=False,  # an access line would carry the query string of a search
        timeout_graceful_shutdown=HTTP_GRACE_S,
        lifespan="on",  # a failing start-up stops the server (and serve) instead of serving without it
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http server", daemon=True)
    thread.start()
    stack.callback(timed, "http", stop_http, server, thread)
    wait_started(lambda: server.started, thread)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    say(f"api      : http://{shown}:{port} (OpenAPI at /docs; probes /healthz, /readyz)")
    return thread


def stop_http(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(HTTP_GRACE_S + 5.0)


def timed(part: str, stop: Callable[..., None], *args: Any) -> None:
    started = time.monotonic()
    stop(*args)
    log.info("serve.stopped part=%s s=%.2f", part, time.monotonic() - started)


def wait_started(started: Callable[[], bool], thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not started():
        if not thread.is_alive():
            raise ConfigError(f"the {thread.name} did not start (see the log above)")
        if time.monotonic() > deadline:
            raise ConfigError(f"the {thread.name} did not start within {START_TIMEOUT_S:.0f}s")
        time.sleep(0.02)


# --- what the lines show ------------------------------------------------------------------


def describe_store(settings: Settings) -> str:
    """The store `build_store` (worker/runtime.py) opens for `settings`."""
    if settings.qdrant_url:
        return f"Qdrant server at {safe_url(settings.qdrant_url)}"
    path = settings.resolved_qdrant_path()
    if path is not None:
        return f"Qdrant local mode at {path.resolve()} (held by this process)"
    return f"Qdrant Edge at {settings.resolved_edge_path().resolve()} (embedded, held by this process)"


def safe_url(url: str) -> str:
    """`url` with any password masked."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
