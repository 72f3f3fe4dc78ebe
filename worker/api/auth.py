"""Bearer `WAN_WORKER_API_KEY` on every endpoint but /health and /metrics; no default key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.settings import Settings, get_settings

bearer = HTTPBearer(auto_error=False, description="WAN_WORKER_API_KEY")


def configured_key(settings: Settings) -> str:
    """The API key; 503 when none is configured (never a default)."""
    if settings.wan_worker_api_key is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "WAN_WORKER_API_KEY is not set on this worker: protected endpoints are disabled",
        )
    return settings.wan_worker_api_key.get_secret_value()


def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> None:
    """503 when no key is configured (never a default), 401 for a missing or wrong key."""
    expected = configured_key(settings).encode()
    given = b"" if credentials is None else credentials.credentials.encode()
    if not hmac.compare_digest(given, expected):  # constant time, whatever the length
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key (Authorization: Bearer <WAN_WORKER_API_KEY>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


#: Add to a route or router to protect it.
Authorized = Depends(require_api_key)
