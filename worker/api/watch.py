"""Watch tokens: a browser's key to one job's page, event stream, preview and result.

A browser cannot put a Bearer header on an `EventSource` or an `<img>`, so the job page and
everything it loads take `?token=`: `<expiry>.<hex HMAC-SHA256 of "watch:<job id>:<expiry>"
keyed with WAN_WORKER_API_KEY>`, the expiry in Unix seconds, UI_TOKEN_TTL_S after it was
issued. Only a caller holding the API key gets one (`POST /jobs`, `POST
/jobs/{id}/watch-token`); it is checked against the job id of the request, so it opens that
job's watching endpoints and nothing else (every other endpoint takes the key alone).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Query, status
from fastapi.security import HTTPAuthorizationCredentials

from worker.api.auth import bearer, configured_key, require_api_key
from worker.api.paths import JobId
from worker.settings import Settings, get_settings


def _signature(key: str, job_id: str, expires_at: int) -> str:
    message = f"watch:{job_id}:{expires_at}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def issue(key: str, job_id: str, *, ttl_s: float, now: float | None = None) -> str:
    """A token for watching `job_id` until `ttl_s` from `now` (default: the clock)."""
    expires_at = int((time.time() if now is None else now) + ttl_s)
    return f"{expires_at}.{_signature(key, job_id, expires_at)}"


def expires_at(token: str) -> int:
    """When a token from `issue` expires, Unix seconds."""
    return int(token.partition(".")[0])


def valid(key: str, job_id: str, token: str, *, now: float | None = None) -> bool:
    """Whether `token` was issued with `key` for `job_id` and has not expired."""
    expiry, _, signature = token.partition(".")
    if not expiry.isdigit() or int(expiry) <= (time.time() if now is None else now):
        return False
    return hmac.compare_digest(signature.encode(), _signature(key, job_id, int(expiry)).encode())


def require_watch(
    job_id: JobId,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
    token: Annotated[str | None, Query(description="a watch token of this job")] = None,
) -> None:
    """The API key as Bearer, or a watch token of this very job: 401 otherwise (503 with no
    key configured, as everywhere)."""
    if token is None:
        require_api_key(credentials, settings)
        return
    if not valid(configured_key(settings), job_id, token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "wrong or expired watch token for this job"
        )


#: Add to a route whose path has `{job_id}`: the key, or that job's watch token.
Watching = Depends(require_watch)
#: What such a route answers a wrong key or token, for its documented responses.
REFUSED = {401: {"description": "neither the API key nor a valid watch token of this job"}}
