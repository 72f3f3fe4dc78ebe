"""GET /health, no auth: can this worker serve; GET /health/details, with the key: who serves.

The platform calls /health before it accepts a registration (within 5 s), and anyone may
call it, so it must stay cheap under any load: one Redis PING (shared by the requests
that arrive while it is in flight) and a view of the workers that a background task
refreshes every REFRESH_S (a Celery broadcast that waits PING_TIMEOUT_S for the answers,
the loaded models, the queue depths). No request ever waits for a worker, and no request
fans out to the workers. 200 when Redis answers; 503 with the reason when it does not.
Under Sentinel it names the master in use and its role; while the sentinels answer but name
no master that answers (a failover under way) it says `degraded`, with 200.

/health says how many workers answer and which queues have none; the node names and the
models they loaded (with their paths) are in /health/details only, behind the API key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from worker import connections
from worker.api.auth import Authorized
from worker.flow.lanes import queue_depth
from worker.observe.loaded_models import LoadedModels
from worker.observe.metrics import Metrics
from worker.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

#: The Celery queues of DESIGN.md's process table.
QUEUES = ("gpu", "enhance", "cpu")
#: How long workers get to answer the broadcast, seconds.
PING_TIMEOUT_S = 1.0
#: Redis probes give up after this, seconds.
REDIS_TIMEOUT_S = 1.0
#: How often the background task surveys the workers, seconds.
REFRESH_S = 5.0
#: A worker view older than this (the survey hangs) makes the answer `degraded`, seconds.
STALE_AFTER_S = 6 * REFRESH_S


class WorkerView(BaseModel):
    queues: list[str]
    models: dict[str, Any]


class Health(BaseModel):
    """`ok`: every queue has a worker; `degraded`: some queue has none (or the workers could
    not be surveyed, or a Redis failover is under way); `unavailable`: no Redis."""

    status: Literal["ok", "degraded", "unavailable"]
    worker: Literal["wan"] = "wan"
    reason: str | None = None
    redis: bool
    #: The role of the Redis in use (`master`), and its address (`host:port`; under
    #: Sentinel the master the sentinels name now).
    redis_role: str | None = None
    redis_master: str | None = None
    #: How many worker processes answered the last survey.
    workers_answering: int = 0
    queues_without_workers: list[str] = []
    queue_depths: dict[str, int] = {}
    #: Seconds since the workers were last surveyed (null: not yet).
    workers_checked_s_ago: float | None = None


class HealthDetails(Health):
    """/health, plus each worker node with its queues and loaded models."""

    workers: dict[str, WorkerView] = {}


def broker_client(settings: Settings) -> redis.Redis:
    """REDIS_URL's Redis (or its Sentinel set's master), with short timeouts, for probes."""
    return connections.probe_client(connections.records_target(settings), timeout_s=REDIS_TIMEOUT_S)


def platform_client(settings: Settings) -> redis.Redis:
    """PLATFORM_REDIS_URL's Redis, with short timeouts, for probes."""
    return connections.probe_client(
        connections.platform_target(settings), timeout_s=REDIS_TIMEOUT_S
    )


@dataclass(frozen=True)
class Survey:
    """What the background task found: the workers, the queue depths, or why not."""

    at: float
    workers: dict[str, WorkerView] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def survey(settings: Settings) -> Survey:
    """The workers that answer a broadcast within PING_TIMEOUT_S with their queues and
    models, and the queue depths (blocking: run in a thread)."""
    from tasks.app import app  # the Celery app, for its broadcast

    broker = broker_client(settings)
    platform = platform_client(settings)
    try:
        if (master := connections.master_address(broker)) is not None:
            Metrics(broker).note_master(master)
        depths = {queue: queue_depth(broker, queue) for queue in QUEUES}
        depths["platform"] = int(platform.llen(settings.platform_queue))
        answers = app.control.inspect(timeout=PING_TIMEOUT_S).active_queues() or {}
        models = LoadedModels(broker).all()
    except (redis.RedisError, OperationalError) as e:
        return Survey(at=time.monotonic(), error=f"Redis unreachable: {e}")
    workers = {
        node: WorkerView(queues=sorted(q["name"] for q in queues), models=models.get(node, {}))
        for node, queues in sorted(answers.items())
    }
    return Survey(at=time.monotonic(), workers=workers, depths=depths)


class HealthMonitor:
    """The API's health: the last survey (refreshed by `run`) and a PING that concurrent
    requests share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.last: Survey | None = None
        self._redis = connections.async_client(
            connections.records_target(settings),
            retry=connections.ASYNC_NO_RETRY,
            timeout_s=REDIS_TIMEOUT_S,
        )
        self._ping: asyncio.Task[connections.MasterView] | None = None

    async def run(self) -> None:
        """Survey every REFRESH_S, in a thread, for as long as the app lives."""
        while True:
            try:
                self.last = await asyncio.to_thread(survey, self.settings)
            except Exception:  # the loop must outlive any one survey
                log.exception("worker survey failed")
            await asyncio.sleep(REFRESH_S)

    async def redis_view(self) -> connections.MasterView:
        """The Redis in use and its role, or why there is none (`connections.probe`).
        Requests that come while a probe is in flight wait for that one: a burst of probes
        costs Redis one command."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.create_task(connections.probe(self._redis))
        return await asyncio.shield(self._ping)

    async def answer(self, *, details: bool) -> Health | JSONResponse:
        redis_view = await self.redis_view()
        if redis_view.failing_over:
            view = Health(status="degraded", redis=False, reason=redis_view.error,
                          redis_master=redis_view.address)  # fmt: skip
            return HealthDetails(**view.model_dump()) if details else view
        if redis_view.error is not None:
            down = Health(status="unavailable", redis=False, reason=redis_view.error)
            return JSONResponse(down.model_dump(), status_code=503)
        where = {"redis_role": redis_view.role, "redis_master": redis_view.address}
        last = self.last
        if last is None:
            view = Health(status="degraded", redis=True, reason="workers not surveyed yet", **where)
            return HealthDetails(**view.model_dump()) if details else view
        served = {queue for view in last.workers.values() for queue in view.queues}
        missing = [queue for queue in QUEUES if queue not in served]
        age = time.monotonic() - last.at
        reasons = [
            f"Redis at {redis_view.address} is a {redis_view.role}, not a master"
            if redis_view.role != "master"
            else None,
            last.error,
            f"no worker consumes {', '.join(missing)}" if missing else None,
            f"the workers were last surveyed {age:.0f} s ago" if age > STALE_AFTER_S else None,
        ]
        reason = "; ".join(r for r in reasons if r) or None
        fields: dict[str, Any] = {
            "status": "degraded" if reason else "ok",
            "reason": reason,
            "redis": True,
            **where,
            "workers_answering": len(last.workers),
            "queues_without_workers": missing,
            "queue_depths": last.depths,
            "workers_checked_s_ago": round(age, 1),
        }
        return HealthDetails(**fields, workers=last.workers) if details else Health(**fields)

    async def aclose(self) -> None:
        await self._redis.aclose()


def monitor_of(request: Request) -> HealthMonitor:
    return request.app.state.health


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(monitor: Annotated[HealthMonitor, Depends(monitor_of)]) -> Health | JSONResponse:
    """Liveness for the platform and load balancers: cheap, no auth, no node names."""
    return await monitor.answer(details=False)


@router.get(
    "/health/details",
    response_model=HealthDetails,
    dependencies=[Authorized],
    responses={503: {"model": Health}},
)
async def health_details(
    monitor: Annotated[HealthMonitor, Depends(monitor_of)],
) -> HealthDetails | JSONResponse:
    """/health with every worker node, its queues and the models it loaded (their paths)."""
    return await monitor.answer(details=True)
