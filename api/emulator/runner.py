"""Run the emulator: `serve` in the foreground, or `start_in_thread` for demos, tests and benchmarks.

uvicorn and httpx are imported when first used: every `sidecar` command imports this package to
build its parser.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from api.emulator.config import EmulatorConfig
from api.emulator.control import check_exposure
from api.emulator.server import create_app

if TYPE_CHECKING:
    import httpx


def serve(
    config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8765, control_token: str | None = None
) -> None:
    """Run the emulator with uvicorn until interrupted (ExposureError if unguarded beyond loopback)."""
    import uvicorn

    check_exposure(host, control_token)
    app = create_app(config, control_token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


class RunningEmulator:
    """An emulator serving from a background thread of this process (demo, tests, benchmarks)."""

    def __init__(
        self,
        config: EmulatorConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = 10.0,
        control_token: str | None = None,
    ) -> None:
        import httpx
        import uvicorn

        check_exposure(host, control_token)
        self._sock = _listening_socket(host, port)
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.config = config
        self.api_key = config.api_keys[0] if config.api_keys else None
        self._control = {"Authorization": f"Bearer {control_token}"} if control_token else {}
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, control_token),
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=1,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="sidecar-emulator", daemon=True
        )
        self._thread.start()
        self.client: httpx.Client = httpx.Client(base_url=self.url, timeout=10.0)
        self._wait_until_answering(start_timeout_s)

    def _wait_until_answering(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client.get("/_emulator/config", headers=self._control).raise_for_status()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    self.stop()
                    raise RuntimeError(f"the emulator did not start on {self.url}") from None
                time.sleep(0.02)

    def configure(self, **fields: object) -> dict[str, Any]:
        """Patch the live config; returns it (API keys masked)."""
        response = self.client.post("/_emulator/config", json=fields, headers=self._control)
        config: dict[str, Any] = response.raise_for_status().json()
        return config

    def bill(self) -> dict[str, Any]:
        bill: dict[str, Any] = (
            self.client.get("/_emulator/bill", headers=self._control).raise_for_status().json()
        )
        return bill

    def log(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = (
            self.client.get("/_emulator/log", headers=self._control).raise_for_status().json()
        )
        return log

    def reset(self) -> None:
        """Empty the bill and log and restore the config this emulator started with."""
        self.client.post("/_emulator/reset", headers=self._control).raise_for_status()
        self.configure(**dataclasses.asdict(self.config))

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._sock.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio then sets TCP_NODELAY on accepted connections
    # (without it every small answer waits ~40 ms for delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def start_in_thread(
    config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0, control_token: str | None = None
) -> RunningEmulator:
    """Start the emulator on a background thread; `port=0` picks a free port (see `.url`)."""
    return RunningEmulator(config, host, port, control_token=control_token)
