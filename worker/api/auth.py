"""Bearer `WAN_WORKER_API_KEY` on every endpoint but /health and /metrics; no default key.

The fleet page, which a person opens in a browser, takes Basic auth instead: UI_BASIC_AUTH's
user and password, or (unset) any user name with the API key as the password.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

from worker.settings import Settings, get_settings

bearer = HTTPBearer(auto_error=False, description="WAN_WORKER_API_KEY")
_basic = HTTPBasic(auto_error=False, realm="WAN worker fleet")


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


def require_fleet_login(
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> None:
    """Basic auth: UI_BASIC_AUTH (`user:password`, or a password for any user name), else
    any user name with the API key as the password; 401 asks the browser for a login."""
    user: str | None = None
    if settings.ui_basic_auth is not None:
        user, sep, password = settings.ui_basic_auth.get_secret_value().partition(":")
        if not sep:
            user, password = None, user
    else:
        password = configured_key(settings)
    given = credentials or HTTPBasicCredentials(username="", password="")
    matches = hmac.compare_digest(given.password.encode(), password.encode())
    if user is not None:
        matches &= hmac.compare_digest(given.username.encode(), user.encode())
    if not matches:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "login with UI_BASIC_AUTH (or any user name and the API key as the password)",
            headers={"WWW-Authenticate": 'Basic realm="WAN worker fleet"'},
        )


#: Add to the fleet page.
FleetLogin = Depends(require_fleet_login)
