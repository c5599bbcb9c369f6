"""Bearer tokens: SIDECAR_API_TOKENS may read and write, SIDECAR_API_READ_TOKENS only read.

Tokens are compared in constant time against every configured token (no early exit), so the
answer time does not tell how much of a guess was right. No token configured: every call is 401.
"""

from __future__ import annotations

import hmac
from typing import Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import deps
from worker.settings import Settings

Role = Literal["read", "write"]


_bearer = HTTPBearer(
    auto_error=False, description="a token from SIDECAR_API_TOKENS or SIDECAR_API_READ_TOKENS"
)


def role_of(settings: Settings, token: str) -> Role | None:
    given = token.encode()
    write = read = False
    for secret in settings.api_tokens:
        write |= hmac.compare_digest(given, secret.get_secret_value().encode())
    for secret in settings.api_read_tokens:
        read |= hmac.compare_digest(given, secret.get_secret_value().encode())
    return "write" if write else "read" if read else None


def role_or_none(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Role | None:
    """The caller's role, or None without a valid token (for the open routes that say more to callers
    with one)."""
    return None if credentials is None else role_of(deps.settings(request), credentials.credentials)


def _role(role: Role | None = Depends(role_or_none)) -> Role:
    if role is None:
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return role


def can_read(role: Role = Depends(_role)) -> Role:
    return role


def can_write(role: Role = Depends(_role)) -> Role:
    if role != "write":
        raise HTTPException(403, "this token may only read; writing needs one from SIDECAR_API_TOKENS")
    return role
