"""What every route needs from the app: a SQL session per request, and the settings objects."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session


def session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as s:
        yield s
