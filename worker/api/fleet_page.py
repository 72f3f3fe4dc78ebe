"""GET /ui/: the fleet on one page, as the on-call engineer wants to see it.

Who is generating what, what waits in which lane, what failed and why: the workers that
/health/details surveyed, by host, each with the job stage it runs now (the leases in the
job records); the queue depths, and the lanes' waiting jobs and oldest wait that /metrics
exports; the last 50 jobs and dead letters with their errors, from the job records.
It keeps nothing of its own. Every job links to its page with a fresh watch token. Basic
auth (`auth.require_fleet_login`); the browser reloads it every REFRESH_S.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from worker.api import watch
from worker.api.auth import FleetLogin
from worker.api.health import HealthDetails, HealthMonitor, monitor_of
from worker.api.ui import PAGE_HEADERS, templates
from worker.flow.lanes import WaitingJobs
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import JobRecord, JobRecords, get_records
from worker.jobs.views import job_summary
from worker.settings import Settings, get_settings

router = APIRouter(tags=["pages"], include_in_schema=False)

#: The queue a stage's worker takes it from (celeryconfig's routes; a media stage may come
#: from its host's `cpu.<host>`, which the same media worker consumes).
STAGE_QUEUES = {"enhance": "enhance", "generate": "gpu"}
MEDIA_QUEUE = "cpu"
#: The newest jobs listed, and the newest dead letters.
LAST_JOBS = 50
#: Waiting jobs listed per lane, the longest-waiting first.
LANE_JOBS = 20
#: How often the browser reloads the page, seconds.
REFRESH_S = 5


@dataclass(frozen=True)
class Running:
    """A stage that runs now: its job, and how far it is."""

    job_id: str
    job_type: str | None
    stage: str
    detail: str
    #: Who holds the stage's lease (`hostname:pid`).
    owner: str
    page_url: str | None


@dataclass
class WorkerRow:
    node: str
    queues: list[str]
    running: list[Running] = field(default_factory=list)


@dataclass
class HostRow:
    host: str
    workers: list[WorkerRow] = field(default_factory=list)
    #: Stages running on the host that no single surveyed worker there can be named for.
    unplaced: list[Running] = field(default_factory=list)


@dataclass(frozen=True)
class Waiting:
    job_id: str
    waited_s: float
    page_url: str | None


@dataclass(frozen=True)
class LaneRow:
    lane: str
    waiting: int
    oldest_wait_s: float
    jobs: list[Waiting]


@dataclass(frozen=True)
class JobRow:
    job_id: str
    job_type: str | None
    status: str | None
    #: The stage it failed at, else the one it is at (or ended with).
    stage: str | None
    #: Wall seconds of the stages that finished.
    seconds: float | None
    error: str | None
    page_url: str | None
    #: For the dead letters: when the job was given up on (UTC).
    dead_at: str | None = None


@dataclass(frozen=True)
class Fleet:
    health: HealthDetails
    hosts: list[HostRow]
    lanes: list[LaneRow]
    jobs: list[JobRow]
    dead: list[JobRow]


class _Pages:
    """Links to job pages, each with a fresh watch token (none without an API key to sign)."""

    def __init__(self, settings: Settings) -> None:
        self.key = settings.wan_worker_api_key
        self.ttl_s = settings.ui_token_ttl_s

    def url(self, job_id: str) -> str | None:
        if self.key is None:
            return None
        token = watch.issue(self.key.get_secret_value(), job_id, ttl_s=self.ttl_s)
        return f"/ui/jobs/{job_id}?token={token}"


def running_stages(record: JobRecord, pages: _Pages) -> list[tuple[str | None, Running]]:
    """(host, stage) of each stage of the job whose lease is held now."""
    progress = record.value("progress") or {}
    found = []
    for name, owner in record.fields.items():
        if not name.startswith("lease:"):
            continue
        stage = name.removeprefix("lease:")
        detail = ""
        if stage == progress.get("stage") and progress.get("step") is not None:
            detail = f"step {progress['step']}/{progress['total_steps']}"
        if stage == progress.get("stage") and progress.get("percent") is not None:
            detail = f"{detail}, {progress['percent']:.0f} %".lstrip(", ")
        running = Running(record.job_id, record.fields.get("job_type"), stage, detail, owner,
                          pages.url(record.job_id))  # fmt: skip
        found.append((record.host(stage), running))
    return found


def hosts_of(health: HealthDetails, running: list[tuple[str | None, Running]]) -> list[HostRow]:
    """The surveyed workers by host (a node is `name@host`), each with what it runs."""
    hosts: dict[str, HostRow] = {}
    for node, view in health.workers.items():
        host = hosts.setdefault(node.partition("@")[2], HostRow(node.partition("@")[2]))
        host.workers.append(WorkerRow(node, view.queues))
    for host_name, stage in running:
        host = hosts.setdefault(host_name or "?", HostRow(host_name or "?"))
        queue = STAGE_QUEUES.get(stage.stage, MEDIA_QUEUE)
        takers = [worker for worker in host.workers if queue in worker.queues]
        if len(takers) == 1:
            takers[0].running.append(stage)
        else:
            host.unplaced.append(stage)
    return [hosts[name] for name in sorted(hosts)]


def job_row(record: JobRecord, pages: _Pages, *, dead_at: float | None = None) -> JobRow:
    summary = job_summary(record)
    seconds = record.stage_seconds()
    when = None
    if dead_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(dead_at))
    return JobRow(
        job_id=record.job_id,
        job_type=summary.job_type,
        status=summary.status,
        stage=record.fields.get("error_stage") or summary.stage,  # where it failed, if it did
        seconds=round(sum(seconds.values()), 1) if seconds else None,
        error=summary.error,
        page_url=pages.url(record.job_id),
        dead_at=when,
    )


def read_fleet(settings: Settings, health: HealthDetails, records: JobRecords) -> Fleet:
    """Everything but the health from Redis (blocking: run in a thread)."""
    pages = _Pages(settings)
    running = [found for record, _ in records.active() for found in running_stages(record, pages)]
    waiting = WaitingJobs(records.redis, settings)
    lanes = [
        LaneRow(lane, state.waiting, state.oldest_wait_s,
                [Waiting(job_id, waited_s, pages.url(job_id))
                 for job_id, waited_s in waiting.waiting(lane, limit=LANE_JOBS)])
        for lane, state in waiting.state().items()
    ]  # fmt: skip
    jobs = [job_row(record, pages) for record in islice(records.newest(page=LAST_JOBS), LAST_JOBS)]
    dead = [
        job_row(records.get(job_id), pages, dead_at=at)
        for job_id, at in DeadLetters(records.redis).list()[-LAST_JOBS:]
    ]
    return Fleet(health, hosts_of(health, running), lanes, jobs, dead)


@router.get("/ui/", dependencies=[FleetLogin], response_class=HTMLResponse, response_model=None)
async def fleet_page(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    monitor: Annotated[HealthMonitor, Depends(monitor_of)],
) -> HTMLResponse | JSONResponse:
    health = await monitor.answer(details=True)
    if isinstance(health, JSONResponse):  # no Redis: nothing else to read either
        return health
    assert isinstance(health, HealthDetails)
    fleet = await asyncio.to_thread(read_fleet, settings, health, get_records())
    return templates.TemplateResponse(request, "fleet.html",
                                      {"fleet": fleet, "refresh_s": REFRESH_S},
                                      headers=PAGE_HEADERS)  # fmt: skip
