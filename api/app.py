"""The HTTP API (FastAPI). For now: liveness; events, documents and spend follow (issue 5)."""

from __future__ import annotations

from fastapi import FastAPI

from worker.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="vector-sidecar", version="0.1.0")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    return app
