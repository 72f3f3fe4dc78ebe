"""POST /jobs and GET /jobs/{id}: the platform list's job body over HTTP, and the job record.

A job posted here is validated by the same job model and started by the same submit path
as the bridge, so the same id twice (here, on the list, or both) starts one chain.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from worker.api.auth import Authorized
from worker.dispatch import seen_before, submit
from worker.errors import InvalidJob
from worker.jobs import PROMPT_MAX_CHARS, SAFE_ID, JobType, parse_job
from worker.records import JobRecord, get_records

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Authorized], tags=["jobs"])

JobId = Annotated[str, Path(pattern=SAFE_ID.pattern, description="the job's uuid")]


class Accepted(BaseModel):
    job_id: str
    status: str
    #: False when the id was seen before: nothing new started, `status` is the job's own.
    created: bool


class StageTiming(BaseModel):
    started_at: float
    finished_at: float | None
    seconds: float | None


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
    attempts: dict[str, int]
    timings: dict[str, StageTiming]
    error: JobError | None
    assets: list[Asset]
    seed: int | None
    enhancement: dict[str, Any] | None
    final_callback: str | None


class JobBody(BaseModel):
    """The documented shape of a job (CONTRACT.md section 1); the job model checks the rest.

    Only documentation: the body is validated by `parse_job`, exactly as on the platform
    list, so cross-field rules (an image makes one frame) and both generations of `config`
    names hold here too. Legacy names (`job_id`, `job_type`) are accepted as on the list.
    """

    model_config = ConfigDict(extra="allow")

    id: str = Field(pattern=SAFE_ID.pattern)
    type: Literal[tuple(t.value for t in JobType)]  # type: ignore[valid-type]
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    user_id: str = Field(pattern=SAFE_ID.pattern)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


JOB_EXAMPLE = {
    "id": "3f1c2a9e-5b7d-4c1e-9a2b-7d4e5f6a7b8c",
    "type": "image_fast",
    "prompt": "a lighthouse on a cliff under a starry sky",
    "user_id": "user-1",
    "config": {"seed": 42},
}


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses={200: {"model": Accepted, "description": "seen before; nothing new started"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": JobBody.model_json_schema(),
                    "example": JOB_EXAMPLE,
                }
            },
        }
    },
)
def post_job(body: Annotated[dict[str, Any], Body()]) -> Accepted | JSONResponse:
    """Start a job from the body the platform list takes (CONTRACT.md section 1)."""
    try:
        job = parse_job(body)
    except Exception as e:  # a parser bug, too, is this request's error, never a 500
        field = e.field if isinstance(e, InvalidJob) else "body"
        log.warning("POST /jobs refused: %s", e, exc_info=not isinstance(e, InvalidJob))
        detail = [{"loc": ["body", *field.split(".")], "msg": str(e), "type": "invalid_job"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    records = get_records()
    if seen_before(records, job.id):
        status_now = records.get(job.id).status or "queued"  # held: still being submitted
        existing = Accepted(job_id=job.id, status=status_now, created=False)
        return JSONResponse(existing.model_dump(), status_code=status.HTTP_200_OK)
    submit(records, job, payload=json.dumps(body))
    return Accepted(job_id=job.id, status="queued", created=True)


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def get_job(job_id: JobId) -> JobView:
    record = get_records().get(job_id)
    if not record.fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job_view(record)


def job_view(record: JobRecord) -> JobView:
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
    error = None
    if "error" in fields:
        error = JobError(
            message=fields["error"], type=fields.get("error_type"), stage=fields.get("error_stage")
        )
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
        attempts={stage: int(fields.get(f"attempts:{stage}", 0)) for stage in stages},
        timings=timings,
        error=error,
        assets=assets,
        seed=generation.get("seed", record.value("seed")),
        enhancement=record.value("enhancement"),
        final_callback=fields.get("final_callback"),
    )


def _float_or_none(text: str | None) -> float | None:
    return None if text is None else float(text)
