"""Bearer tokens: SIDECAR_API_TOKENS may read and write, SIDECAR_API_READ_TOKENS only read.

Tokens are compared in constant time against every configured token (no early exit), so the
answer time does not tell how much of a guess was right. No token configured: every call is 401.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Role = Literal["read", "write"]


class ApiSettings(BaseSettings):
    """SIDECAR_API_*: comma-separated tokens, and the request body cap of POST /v1/events."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", env_file=".env", extra="ignore")

    api_tokens: Annotated[list[SecretStr], NoDecode] = []
    api_read_tokens: Annotated[list[SecretStr], NoDecode] = []
    api_max_body_bytes: int = 32 << 20
    api_max_events: int = 10_000

    @field_validator("api_tokens", "api_read_tokens", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value


_bearer = HTTPBearer(auto_error=False, description="a token from SIDECAR_API_TOKENS or SIDECAR_API_READ_TOKENS")


def role_of(settings: ApiSettings, token: str) -> Role | None:
    given = token.encode()
    write = read = False
    for secret in settings.api_tokens:
        write |= hmac.compare_digest(given, secret.get_secret_value().encode())
    for secret in settings.api_read_tokens:
        read |= hmac.compare_digest(given, secret.get_secret_value().encode())
    return "write" if write else "read" if read else None


def _role(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Role:
    role = None if credentials is None else role_of(request.app.state.api_settings, credentials.credentials)
    if role is None:
        raise HTTPException(401, "a valid bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    return role


def can_read(role: Role = Depends(_role)) -> Role:
    return role


def can_write(role: Role = Depends(_role)) -> Role:
    if role != "write":
        raise HTTPException(403, "this token may only read; writing needs one from SIDECAR_API_TOKENS")
    return role
