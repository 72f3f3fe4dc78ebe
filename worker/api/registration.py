"""Auto-registration (CONTRACT.md section 6): tell the platform this API's public URL, once.

Only when `RUNPOD_POD_ID` or `PUBLIC_URL` is set. The platform checks `{worker_url}/health`
within 5 s before it accepts, so registration waits until this API's own /health answers.
Retried with backoff and jitter on network trouble, 429 and 5xx; a failure is logged and the
API serves on regardless.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from worker.errors import JobError, TransientError, error_for_status
from worker.settings import Settings

log = logging.getLogger(__name__)

#: How long registration waits for this API's own /health, seconds.
HEALTH_WAIT_S = 120.0
#: Attempts at the platform, and the cap of the backoff between them, seconds.
REGISTRATION_ATTEMPTS = 8
REGISTRATION_BACKOFF_MAX_S = 60.0


def registration_body(settings: Settings) -> dict[str, Any]:
    return {
        "worker_url": settings.public_url,
        "auto_registered": True,
        "registration_method": "wan_worker_self_registration",
        "detection_method": "RUNPOD_POD_ID" if settings.runpod_pod_id else "PUBLIC_URL",
        "timestamp": datetime.now(UTC).isoformat(),
    }


async def _wait_for_own_health(client: httpx.AsyncClient, url: str) -> bool:
    deadline = asyncio.get_running_loop().time() + HEALTH_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        try:
            if (await client.get(url, timeout=5)).status_code == 200:
                return True
        except httpx.TransportError:
            pass  # not listening yet
        await asyncio.sleep(0.5)
    return False


async def _post(client: httpx.AsyncClient, settings: Settings) -> None:
    assert settings.supabase_url and settings.supabase_service_key  # checked by register()
    url = f"{settings.supabase_url.rstrip('/')}/functions/v1/update-worker-url"
    headers = {"Authorization": f"Bearer {settings.supabase_service_key.get_secret_value()}"}
    try:
        response = await client.post(url, json=registration_body(settings), headers=headers)
    except httpx.TransportError as e:
        raise TransientError(f"update-worker-url: {type(e).__name__}: {e}") from e
    if response.is_error:
        raise error_for_status(response.status_code, "update-worker-url")


async def register(settings: Settings) -> bool:
    """Register this API's URL with the platform once; True when the platform accepted it."""
    if not settings.public_url:
        return False
    if not settings.supabase_url or not settings.supabase_service_key:
        log.warning("PUBLIC_URL is set but SUPABASE_URL or SUPABASE_SERVICE_KEY is not: "
                    "this worker does not register itself")  # fmt: skip
        return False
    own_health = f"http://127.0.0.1:{settings.api_port}/health"
    async with httpx.AsyncClient(timeout=10) as client:
        if not await _wait_for_own_health(client, own_health):
            log.error("registration skipped: %s did not answer 200 within %.0f s",
                      own_health, HEALTH_WAIT_S)  # fmt: skip
            return False
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TransientError),
                wait=wait_exponential_jitter(initial=1, max=REGISTRATION_BACKOFF_MAX_S),
                stop=stop_after_attempt(REGISTRATION_ATTEMPTS),
                reraise=True,
            ):
                with attempt:
                    await _post(client, settings)
        except JobError as e:
            log.error("registration with the platform failed (the API serves on): %s", e)
            return False
    log.info("registered %s with the platform", settings.public_url)
    return True
