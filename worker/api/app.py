"""The FastAPI app and `python -m worker api`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from worker.api import (
    debug,
    enhance,
    events,
    fleet_page,
    health,
    job_page,
    jobs,
    metrics,
    previews,
    results,
    ui,
)
from worker.api.registration import register
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The shortest WAN_WORKER_API_KEY the API starts with: a short key is guessed, not kept.
API_KEY_MIN_CHARS = 16


def check_api_key(settings: Settings) -> None:
    """Exit, naming the setting, with a key too short to protect anything (its value is never
    shown); warn without one (the protected endpoints answer 503)."""
    key = settings.wan_worker_api_key
    if key is None:
        log.warning("WAN_WORKER_API_KEY is not set: every endpoint but /health answers 503")
    elif len(key.get_secret_value()) < API_KEY_MIN_CHARS:
        log.critical("WAN_WORKER_API_KEY has %d characters, at least %d are needed (e.g. "
                     "`openssl rand -hex 16`): the API does not start",
                     len(key.get_secret_value()), API_KEY_MIN_CHARS)  # fmt: skip
        raise SystemExit(2)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Register once per start, in the background: serving never waits for the platform.
    The workers' survey for /health and the event streams' shared Redis subscription live
    as long as the app."""
    settings = get_settings()
    app.state.event_hub = events.make_hub(settings)
    app.state.health = health.HealthMonitor(settings)
    background = [
        asyncio.create_task(app.state.health.run()),
        asyncio.create_task(register(settings)),
    ]
    yield
    for task in background:
        task.cancel()
    await app.state.health.aclose()
    await app.state.event_hub.aclose()


def create_app() -> FastAPI:
    app = FastAPI(
        title="WAN worker",
        summary="Prompt enhancement, jobs and health of the WAN 2.1 video worker",
        version="0.1.0",
        lifespan=_lifespan,
    )
    routers = (health, metrics, enhance, jobs, events, previews, results, job_page, fleet_page,
               debug)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    ui.mount_static(app)
    ui.allow_origins(app, get_settings())
    return app


def main() -> None:
    """Serve on API_HOST:API_PORT until SIGTERM or Ctrl-C."""
    import uvicorn

    settings = get_settings()
    check_api_key(settings)
    log.info("HTTP API serving on %s:%d", settings.api_host, settings.api_port)
    # log_config=None: uvicorn's lines go through the root logger, in LOG_FORMAT.
    uvicorn.run(create_app(), host=settings.api_host, port=settings.api_port, log_config=None)
