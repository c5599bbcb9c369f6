"""What every route needs from the app: the one Settings object and a SQL session per request."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from worker.settings import Settings


def settings(request: Request) -> Settings:
    """The Settings the app was created with (`create_app(settings)`)."""
    found: Settings = request.app.state.settings
    return found


def session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as s:
        yield s
