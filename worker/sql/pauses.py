"""Pauses of embedding shared by every process through SQL (account-level provider errors).

A pause expires by itself; the first call after it is the probe: success clears it, the same
error sets it again. So work resumes on its own when the cause (key, arrears) is fixed.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.sql.engines import insert_ignore
from worker.sql.models import ProviderPause, utcnow

PROVIDER = "provider"


def pause(session: Session, reason: str, *, for_s: float, name: str = PROVIDER) -> None:
    now = utcnow()
    until = now + dt.timedelta(seconds=for_s)
    if not insert_ignore(
        session, ProviderPause, {"name": name, "reason": reason, "since": now, "until": until}
    ):
        session.execute(
            sa.update(ProviderPause).where(ProviderPause.name == name).values(reason=reason, until=until)
        )


def active(session: Session, *, name: str = PROVIDER) -> ProviderPause | None:
    """The pause in force now, if any."""
    row = session.get(ProviderPause, name)
    return row if row is not None and row.until > utcnow() else None


def current(session: Session) -> list[dict[str, str]]:
    """Every pause row (expired ones are shown as probing), for status and readiness."""
    now = utcnow()
    return [
        {
            "name": p.name,
            "reason": p.reason,
            "since": p.since.isoformat(),
            "until": p.until.isoformat(),
            "state": "paused" if p.until > now else "probing",
        }
        for p in session.execute(sa.select(ProviderPause)).scalars()
    ]


def clear(session: Session, *, name: str = PROVIDER) -> None:
    session.execute(sa.delete(ProviderPause).where(ProviderPause.name == name))
