"""Job records as people and programs read them: `GET /jobs/{id}` and `celery -A tasks jobs`.

One model per view, built from a record snapshot only, so the API and the CLI show the same
thing for the same job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import JobRecord, JobRecords

#: Every status a job record can hold.
STATUSES = ("queued", "processing", "completed", "failed", "cancelled", "delivery_failed")


class StageTiming(BaseModel):
    started_at: float
    finished_at: float | None
    seconds: float | None


class StageLease(BaseModel):
    """Who runs a stage now (`hostname:pid`), and until when unless it renews the lease."""

    stage: str
    owner: str
    until: float


class JobError(BaseModel):
    message: str
    type: str | None
    stage: str | None


class Asset(BaseModel):
    type: Literal["video", "image"]
    url: str
    thumbnail_url: str


class JobView(BaseModel):
    """The job record as the platform and the on-call engineer read it."""

    job_id: str
    job_type: str | None
    status: str | None
    stage: str | None
    created_at: float | None
    #: Starts of each stage, Celery's retries of network stages included.
    attempts: dict[str, int]
    #: Deliveries of each stage: 1, plus one per worker that died running it.
    deliveries: dict[str, int]
    #: The WORKER_HOST that ran each stage (its latest delivery).
    hosts: dict[str, str]
    #: The leases of stages running now.
    leases: list[StageLease]
    timings: dict[str, StageTiming]
    #: The latest progress event (`stage`, `step`, `total_steps`, `percent`, ...), or the
    #: `final` one; GET /jobs/{id}/events streams them all.
    progress: dict[str, Any] | None
    error: JobError | None
    #: An undelivered final callback (status `delivery_failed`); `error` stays the job's own.
    delivery_error: JobError | None
    assets: list[Asset]
    seed: int | None
    enhancement: dict[str, Any] | None
    final_callback: str | None
    #: Callback status -> when the platform accepted it.
    callbacks: dict[str, float]
    cancel_requested_at: float | None
    #: Where a cancelled job stopped (`queued` when it never started).
    cancelled_stage: str | None
    #: How many times an operator sent the job again.
    retries: int
    #: When the record expires unless written again (every write renews it for
    #: JOB_RECORD_TTL_S); None when not asked for.
    expires_at: float | None = None


class JobSummary(BaseModel):
    """One line of `jobs list` and `jobs dead`."""

    job_id: str
    job_type: str | None
    status: str | None
    stage: str | None
    created_at: float | None
    error: str | None


class DeadJob(JobSummary):
    dead_at: float


def job_view(record: JobRecord, *, expires_at: float | None = None) -> JobView:
    fields = record.fields
    stages = sorted(  # chain order: by first start
        (name.removeprefix("started:") for name in fields if name.startswith("started:")),
        key=lambda stage: float(fields[f"started:{stage}"]),
    )
    seconds = record.stage_seconds()
    timings = {
        stage: StageTiming(
            started_at=float(fields[f"started:{stage}"]),
            finished_at=_float_or_none(fields.get(f"finished:{stage}")),
            seconds=seconds.get(stage),
        )
        for stage in stages
    }
    assets = []
    if record.value("uploaded") and "job" in fields:
        job = record.job
        assets = [Asset(type=job.content_type, url=job.asset_key, thumbnail_url=job.thumbnail_key)]
    generation = record.value("generation") or {}
    return JobView(
        job_id=record.job_id,
        job_type=fields.get("job_type"),
        status=record.status,
        stage=fields.get("stage") or None,
        created_at=_float_or_none(fields.get("claimed_at")),
        attempts={stage: int(fields.get(f"attempts:{stage}", 0)) for stage in stages},
        deliveries={stage: int(fields.get(f"deliveries:{stage}", 0)) for stage in stages},
        hosts={stage: host for stage in stages if (host := record.host(stage)) is not None},
        leases=[
            StageLease(
                stage=stage,
                owner=fields[f"lease:{stage}"],
                until=float(fields[f"lease_until:{stage}"]),
            )
            for stage in stages
            if f"lease:{stage}" in fields
        ],  # fmt: skip
        timings=timings,
        progress=record.value("progress"),
        error=_error(fields, "error"),
        delivery_error=_error(fields, "delivery_error"),
        assets=assets,
        seed=generation.get("seed", record.value("seed")),
        enhancement=record.value("enhancement"),
        final_callback=fields.get("final_callback"),
        callbacks={
            name.removeprefix("callback_sent:"): float(at)
            for name, at in fields.items()
            if name.startswith("callback_sent:")
        },
        cancel_requested_at=_float_or_none(fields.get("cancel_requested_at")),
        cancelled_stage=fields.get("cancelled_stage"),
        retries=int(fields.get("retries", 0)),
        expires_at=expires_at,
    )


def job_summary(record: JobRecord) -> JobSummary:
    fields = record.fields
    return JobSummary(
        job_id=record.job_id,
        job_type=fields.get("job_type"),
        status=record.status,
        stage=fields.get("stage") or None,
        created_at=_float_or_none(fields.get("claimed_at")),
        error=fields.get("error") or fields.get("delivery_error"),
    )


def list_jobs(
    records: JobRecords, *, status: str | None = None, limit: int = 20
) -> list[JobSummary]:
    """The newest `limit` jobs, of one status if given."""
    found = []
    for record in records.newest():
        if status is None or record.status == status:
            found.append(job_summary(record))
            if len(found) >= limit:
                break
    return found


def dead_jobs(records: JobRecords) -> list[DeadJob]:
    """The dead letters, oldest first, with what their records still say."""
    return [
        DeadJob(dead_at=at, **job_summary(records.get(job_id)).model_dump())
        for job_id, at in DeadLetters(records.redis).list()
    ]


def _error(fields: dict[str, str], name: str) -> JobError | None:
    if name not in fields:
        return None
    return JobError(
        message=fields[name], type=fields.get(f"{name}_type"), stage=fields.get(f"{name}_stage")
    )


def _float_or_none(text: str | None) -> float | None:
    return None if text is None else float(text)
