"""`sidecar serve` end to end: one real process running the worker, its embedding threads, the HTTP
API and the bundled emulator; events go in over HTTP, documents come out indexed and searchable.

On the embedded default (SQLite broker and database, the default store in SIDECAR_DATA_DIR) and on
Redis + PostgreSQL. Shutdown: SIGTERM exits 0 without a traceback, messages not yet consumed are
consumed by the next start, a second signal exits at once; start-up refuses an outdated schema
and a taken port with one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WRITE = "serve-write-token"
READ = "serve-read-token"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any SIDECAR_*/DASHSCOPE_* setting, on `data_dir`, with API tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "DASHSCOPE_"))}
    return env | {
        "SIDECAR_DATA_DIR": str(data_dir),
        "SIDECAR_API_TOKENS": WRITE,
        "SIDECAR_API_READ_TOKENS": READ,
        "SIDECAR_BATCH_MAX_DELAY_S": "0.2",
        **extra,
    }


class Serve:
    """One `python -m api.cli serve …` process, its output (stdout and stderr) in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self._offset = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port), *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0)

    def output(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            return log.read().decode("utf-8", "replace")

    def wait_for(self, condition: Callable[[], T], *, what: str, timeout_s: float = 60.0) -> T:
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited ({self.proc.returncode}) waiting for {what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_for(lambda: "sidecar serve: ready" in self.output(), what="serve to start")

    def post(self, events: Any) -> httpx.Response:
        return self.http.post("/v1/events", json=events, headers={"Authorization": f"Bearer {WRITE}"})

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers={"Authorization": f"Bearer {READ}"})

    def wait_indexed(self, doc_id: str, version: int) -> dict[str, Any]:
        def indexed() -> dict[str, Any] | None:
            answer = self.get(f"/v1/documents/documents/{doc_id}")
            if answer.status_code != 200:
                return None
            body: dict[str, Any] = answer.json()
            return body if body["status"] == "indexed" and body["indexed_version"] == version else None

        return self.wait_for(indexed, what=f"{doc_id} v{version} indexed")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"serve did not exit within {timeout_s}s:\n{self.output()[-4000:]}"
            ) from None

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def started() -> Iterator[list[Serve]]:
    """Every Serve a test starts, killed at the end if the test left it running."""
    processes: list[Serve] = []
    yield processes
    for process in processes:
        process.kill()


def start(
    started: list[Serve], env: dict[str, str], log_path: Path, *args: str, port: int | None = None
) -> Serve:
    process = Serve(env, log_path, *args, port=port)
    started.append(process)
    return process


def upsert(doc_id: str, version: int, text: str) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text}


def check_round_trip(serve: Serve) -> None:
    """Events over HTTP → indexed → ready → found by search."""
    answer = serve.post(
        [
            upsert("ship", 1, "Orders ship within two business days from our warehouse."),
            upsert("refund", 1, "Refunds are issued to the original payment method."),
        ]
    )
    assert answer.status_code == 202, answer.text
    serve.wait_indexed("ship", 1)
    serve.wait_indexed("refund", 1)
    ready = serve.http.get("/readyz", headers={"Authorization": f"Bearer {READ}"})
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    found = serve.get("/v1/search", collection="documents", q="How long does shipping take?", limit=2)
    assert found.status_code == 200, found.text
    assert {hit["doc_id"] for hit in found.json()["hits"]} == {"ship", "refund"}


def assert_clean_exit(serve: Serve, code: int) -> None:
    out = serve.output()
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "sidecar serve: stopped" in out


def test_serve_on_the_embedded_default(tmp_path: Path, started: list[Serve]) -> None:
    env = serve_env(tmp_path / "data")
    log_path = tmp_path / "serve.log"
    serve = start(started, env, log_path, "--emulator")
    serve.wait_ready()
    out = serve.output()
    assert "provider : EMULATED" in out and "(--emulator;" in out
    assert f"database : sqlite:///{(tmp_path / 'data' / 'sidecar.sqlite').resolve()}" in out
    assert "store    : " in out
    assert "broker.sqlite (threads pool" in out
    assert f"api      : http://127.0.0.1:{serve.port}" in out
    check_round_trip(serve)
    assert_clean_exit(serve, serve.stop())


def test_work_left_at_shutdown_is_finished_by_the_next_start(tmp_path: Path, started: list[Serve]) -> None:
    env = serve_env(tmp_path / "data")
    log_path = tmp_path / "serve.log"
    first = start(started, env, log_path)  # no key and no --emulator: emulated as well
    first.wait_ready()
    assert "no DASHSCOPE_API_KEY set" in first.output()
    for n in range(30):  # one broker message each
        assert first.post(upsert(f"doc-{n}", 1, f"document number {n}")).status_code == 202
    assert_clean_exit(first, first.stop())

    second = start(started, env, log_path)  # same data dir: same broker, database and store
    second.wait_ready()
    for n in range(30):
        second.wait_indexed(f"doc-{n}", 1)
    assert_clean_exit(second, second.stop(signal.SIGINT))


def test_serve_on_redis_and_postgres(
    tmp_path: Path, started: list[Serve], redis_url: str, redis_client: Any, postgres_url: str
) -> None:
    env = serve_env(
        tmp_path / "data",
        SIDECAR_BROKER_URL=redis_url,
        SIDECAR_DATABASE_URL=postgres_url,
        DASHSCOPE_API_KEY="sk-not-used-with-emulator",
    )
    serve = start(started, env, tmp_path / "serve.log", "--emulator", "--migrate")
    serve.wait_ready()
    out = serve.output()
    assert "(--emulator;" in out and "schema upgraded to revision" in out
    assert "worker   : consuming sidecar.ingest, sidecar.ingest_many from redis://" in out
    check_round_trip(serve)
    assert_clean_exit(serve, serve.stop())


def test_an_outdated_schema_refuses_to_start(tmp_path: Path, started: list[Serve], postgres_url: str) -> None:
    env = serve_env(tmp_path / "data", SIDECAR_DATABASE_URL=postgres_url)
    serve = start(started, env, tmp_path / "serve.log")  # a database URL: checked, not migrated
    code = serve.proc.wait(60)
    out = serve.output()
    assert code == 2, out
    assert "Traceback" not in out and "sidecar: " in out
    assert "sidecar serve: ready" not in out


def test_a_taken_port_fails_with_one_line(tmp_path: Path, started: list[Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = start(started, serve_env(tmp_path / "data"), tmp_path / "serve.log", port=port)
        code = serve.proc.wait(60)
    out = serve.output()
    assert code == 2, out
    assert f"sidecar: cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out


def test_a_second_signal_exits_at_once(tmp_path: Path, started: list[Serve]) -> None:
    serve = start(started, serve_env(tmp_path / "data"), tmp_path / "serve.log", "--emulator")
    serve.wait_ready()
    # A request whose body never ends: the orderly stop waits for it (HTTP's grace period).
    with socket.create_connection(("127.0.0.1", serve.port)) as pending:
        pending.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + WRITE.encode() + b"\r\nContent-Length: 100\r\n\r\n["
        )
        serve.proc.send_signal(signal.SIGINT)
        serve.wait_for(lambda: "SIGINT received" in serve.output(), what="the first signal's line")
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.stop(timeout_s=30)  # already signalled twice: only waits
    assert code == 128 + signal.SIGTERM, serve.output()
    assert "second signal, exiting now" in serve.output()
