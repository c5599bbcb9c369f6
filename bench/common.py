"""Plumbing every bench needs: child processes, a throwaway PostgreSQL database, a clean Redis db,
the emulator as its own process, CPU and memory of a process from /proc, and the window arithmetic
over the emulator's request log.

Benches measure real processes on real services, so all of this is I/O at the edges; the few pure
functions (`max_window`, `rate_per_min`, `percentile`) are plain arithmetic over plain data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# --- child processes ----------------------------------------------------------------------


def clean_env(**values: str | None) -> dict[str, str]:
    """This process's environment without SIDECAR_* / DASHSCOPE_* settings, plus `values`
    (None drops a name): a bench states every setting its children run with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "DASHSCOPE_"))}
    env.update({k: v for k, v in values.items() if v is not None})
    return env


def start_process(argv: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `python argv...` with its output in `log_path` (the repository root as cwd)."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, *argv], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (a Celery warm shutdown), then SIGKILL after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(
    condition: Callable[[], T],
    *,
    timeout_s: float,
    what: str,
    procs: Sequence[tuple[subprocess.Popen, Path]] = (),
    interval_s: float = 0.1,
) -> T:
    """Poll `condition` until it returns something truthy; fail early if a child exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        for proc, log_path in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(map(str, proc.args[1:4]))} exited ({proc.returncode}) "
                    f"while waiting for {what}; last log lines:\n{tail(log_path)}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text("utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- /proc ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcUsage:
    cpu_s: float  # utime + stime of the process and its waited-for children
    peak_rss_mb: float  # VmHWM


def proc_usage(pid: int) -> ProcUsage:
    """CPU seconds and peak resident memory of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces; fields from 3 on
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime (fields 14-17)
    hwm_kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm_kb = int(line.split()[1])
    return ProcUsage(cpu_s=ticks / os.sysconf("SC_CLK_TCK"), peak_rss_mb=hwm_kb / 1024)


# --- services -------------------------------------------------------------------------------


@contextmanager
def temp_database(server_url: str, prefix: str = "bench") -> Iterator[str]:
    """A fresh PostgreSQL database on the server of `server_url`, dropped (forcefully) afterwards."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def exclusive(server_url: str, name: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock named `name` (e.g. the Redis dbs a bench flushes), so two
    benches never share them; released when the block ends or the process dies."""
    import zlib

    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            key = zlib.crc32(name.encode())
            if not conn.execute(sa.text("select pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                raise RuntimeError(f"another bench is using {name}; wait for it or pick other Redis dbs")
            try:
                yield
            finally:
                conn.execute(sa.text("select pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def redis_db_url(server_url: str, db: int) -> str:
    """The Redis URL `server_url` with its database number replaced by `db`."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(server_url)._replace(path=f"/{db}"))


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class EmulatorProcess:
    """`sidecar emulator` in its own process, so its CPU is not the bench's."""

    def __init__(self, log_path: Path, *, start_timeout_s: float = 30.0, **limits: float | None) -> None:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = ["-m", "api.cli", "emulator", "--port", str(port)]
        for name, value in limits.items():
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        self.log_path = log_path
        self.proc = start_process(argv, clean_env(), log_path)
        self.client = httpx.Client(base_url=self.url, timeout=60.0)

        def answers() -> bool:
            try:
                return self.client.get("/_emulator/config").status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(
                answers,
                timeout_s=start_timeout_s,
                what=f"the emulator on {self.url}",
                procs=[(self.proc, log_path)],
            )
        except BaseException:
            self.stop()
            raise

    def log(self) -> list[dict[str, Any]]:
        return self.client.get("/_emulator/log").raise_for_status().json()

    def reset(self) -> None:
        self.client.post("/_emulator/reset").raise_for_status()

    def usage(self) -> ProcUsage:
        return proc_usage(self.proc.pid)

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, grace_s=5.0)


# --- arithmetic over the emulator's log -----------------------------------------------------


def max_window(entries: Sequence[tuple[float, int]], span_s: float = 60.0) -> tuple[int, int]:
    """The most requests and the most tokens in any window (t - span_s, t] over (at, tokens)
    pairs: the same sliding window the emulator enforces."""
    ordered = sorted(entries)
    best_requests = best_tokens = tokens = start = 0
    for end, (at, cost) in enumerate(ordered):
        tokens += cost
        while ordered[start][0] <= at - span_s:
            tokens -= ordered[start][1]
            start += 1
        best_requests = max(best_requests, end - start + 1)
        best_tokens = max(best_tokens, tokens)
    return best_requests, best_tokens


def rate_per_min(entries: Sequence[tuple[float, int]], cutoff: float | None = None) -> float:
    """Rows per minute of accepted requests given as (at, rows).

    Drained run (no cutoff): rows sent in [first, last) ÷ (last − first), i.e. the rate over the
    intervals between requests, not biased by the last request's rows. Run cut at `cutoff`:
    rows sent in [first, cutoff) ÷ (cutoff − first).
    """
    ordered = sorted(entries)
    if cutoff is not None:
        ordered = [e for e in ordered if e[0] < cutoff]
        if not ordered or cutoff <= ordered[0][0]:
            return 0.0
        return sum(rows for _, rows in ordered) / (cutoff - ordered[0][0]) * 60.0
    if len(ordered) < 2 or ordered[-1][0] <= ordered[0][0]:
        return 0.0
    return sum(rows for _, rows in ordered[:-1]) / (ordered[-1][0] - ordered[0][0]) * 60.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]
