"""GET /health, no auth: can this worker serve, what answers, what waits, what is loaded.

The platform calls it before it accepts a registration (within 5 s), so every probe here
has a short timeout. 200 when Redis answers; 503 with the reason when it does not.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from worker.lanes import queue_depth
from worker.observe.loaded_models import LoadedModels
from worker.settings import Settings, get_settings

router = APIRouter(tags=["health"])

#: The Celery queues of DESIGN.md's process table.
QUEUES = ("gpu", "enhance", "cpu")
#: How long workers get to answer the broadcast, seconds.
PING_TIMEOUT_S = 1.0
#: Redis probes give up after this, seconds.
REDIS_TIMEOUT_S = 1.0


class WorkerView(BaseModel):
    queues: list[str]
    models: dict[str, Any]


class Health(BaseModel):
    """`ok`: every queue has a worker; `degraded`: some queue has none; `unavailable`: no Redis."""

    status: Literal["ok", "degraded", "unavailable"]
    worker: Literal["wan"] = "wan"
    reason: str | None = None
    redis: bool
    workers: dict[str, WorkerView] = {}
    queues_without_workers: list[str] = []
    queue_depths: dict[str, int] = {}


@cache
def redis_client(url: str) -> redis.Redis:
    """A client with short timeouts, one per URL, for probes that must answer fast."""
    return redis.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )


def _workers(broker: redis.Redis) -> dict[str, WorkerView]:
    """Workers that answer a broadcast within PING_TIMEOUT_S, with their queues and models."""
    from tasks import app  # the Celery app, for its broadcast (no torch comes with it)

    answers = app.control.inspect(timeout=PING_TIMEOUT_S).active_queues() or {}
    models = LoadedModels(broker).all()
    return {
        node: WorkerView(queues=sorted(q["name"] for q in queues), models=models.get(node, {}))
        for node, queues in sorted(answers.items())
    }


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(settings: Annotated[Settings, Depends(get_settings)]) -> Health | JSONResponse:
    broker = redis_client(settings.redis_url)
    platform = redis_client(settings.platform_redis_url or settings.redis_url)
    try:
        depths = {queue: queue_depth(broker, queue) for queue in QUEUES}
        depths["platform"] = int(platform.llen(settings.platform_queue))
        workers = _workers(broker)
    except (redis.RedisError, OperationalError) as e:
        down = Health(status="unavailable", redis=False, reason=f"Redis unreachable: {e}")
        return JSONResponse(down.model_dump(), status_code=503)
    served = {queue for view in workers.values() for queue in view.queues}
    missing = [queue for queue in QUEUES if queue not in served]
    return Health(
        status="degraded" if missing else "ok",
        reason=f"no worker consumes {', '.join(missing)}" if missing else None,
        redis=True,
        workers=workers,
        queues_without_workers=missing,
        queue_depths=depths,
    )
