"""POST /jobs, GET /jobs/{id}, and cancel and retry: jobs over HTTP.

A job posted here is validated by the same job model and started by the same submit path
as the bridge, so the same id twice (here, on the list, or both) starts one chain. The job
view, cancel and retry are the ones `celery -A tasks jobs` uses.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from worker.api import watch
from worker.api.auth import Authorized, configured_key
from worker.api.paths import JobId
from worker.errors import InvalidJob
from worker.flow.dispatch import claim, claim_left_s, submit
from worker.flow.job_control import Answer, Outcome, cancel, retry
from worker.flow.sender import Sender
from worker.jobs.model import PROMPT_MAX_CHARS, SAFE_ID, JobType, parse_job
from worker.jobs.records import get_records
from worker.jobs.views import JobView, job_view
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Authorized], tags=["jobs"])


def get_sender() -> Sender:
    """What sends the chains and final callbacks of jobs started, cancelled or retried here."""
    from tasks.chain import SENDER  # the Celery app, only once a request comes

    return SENDER


#: The sender, as a request's dependency.
SenderFor = Annotated[Sender, Depends(get_sender)]


class Accepted(BaseModel):
    job_id: str
    status: str
    #: False when the id was seen before: nothing new started, `status` is the job's own.
    created: bool
    #: Opens this job's page, event stream, preview and result for UI_TOKEN_TTL_S
    #: (`?token=`); nothing else.
    watch_token: str


class WatchToken(BaseModel):
    job_id: str
    watch_token: str
    #: When the token stops working, Unix seconds.
    expires_at: int
    #: The job page, token included (a path on this API).
    page_url: str


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
    responses={
        200: {"model": Accepted, "description": "seen before; nothing new started"},
        409: {"description": "another dispatcher holds the id's claim: send it again later"},
    },
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
def post_job(
    body: Annotated[dict[str, Any], Body()],
    sender: SenderFor,
    settings: Annotated[Settings, Depends(get_settings)],
) -> Accepted | JSONResponse:
    """Start a job from the body the platform list takes (CONTRACT.md section 1)."""
    try:
        job = parse_job(body)
    except Exception as e:  # a parser bug, too, is this request's error, never a 500
        field = e.field if isinstance(e, InvalidJob) else "body"
        log.warning("POST /jobs refused: %s", e, exc_info=not isinstance(e, InvalidJob))
        detail = [{"loc": ["body", *field.split(".")], "msg": str(e), "type": "invalid_job"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    records = get_records()
    outcome = claim(records, job.id)
    if outcome == "held":  # its holder may have died before sending it: not `queued` yet
        left_s = math.ceil(claim_left_s(records, job.id))
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job.id} is being submitted by another dispatcher, which may have died "
            f"before sending it: send it again in {left_s} s, when its claim has run out",
            headers={"Retry-After": str(max(left_s, 1))},
        )
    token = _watch_token(settings, job.id)
    if outcome == "dispatched":
        status_now = records.get(job.id).status or "queued"
        existing = Accepted(job_id=job.id, status=status_now, created=False, watch_token=token)
        return JSONResponse(existing.model_dump(), status_code=status.HTTP_200_OK)
    submit(records, job, payload=json.dumps(body), sender=sender)
    return Accepted(job_id=job.id, status="queued", created=True, watch_token=token)


def _watch_token(settings: Settings, job_id: str) -> str:
    return watch.issue(configured_key(settings), job_id, ttl_s=settings.ui_token_ttl_s)


@router.post("/jobs/{job_id}/watch-token")
def watch_token(job_id: JobId, settings: Annotated[Settings, Depends(get_settings)]) -> WatchToken:
    """A fresh watch token for the job's page (`GET /ui/jobs/{id}?token=`), its event stream,
    preview and result: for a browser, which cannot send the API key. Valid UI_TOKEN_TTL_S."""
    token = _watch_token(settings, job_id)
    return WatchToken(job_id=job_id, watch_token=token, expires_at=watch.expires_at(token),
                      page_url=f"/ui/jobs/{job_id}?token={token}")  # fmt: skip


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def get_job(job_id: JobId) -> JobView:
    records = get_records()
    record = records.get(job_id)
    if not record.fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job_view(record, expires_at=records.expires_at(job_id))


class ControlAnswer(BaseModel):
    job_id: str
    #: The job's status after the request.
    status: str | None
    message: str


class RetryOptions(BaseModel):
    #: Run the whole chain again instead of starting at the stage the job stopped at.
    from_start: bool = False
    #: Send a running or completed job again anyway.
    force: bool = False


#: A request the job's state does not allow, or no such job.
REFUSALS = {
    404: {"description": "no such job"},
    409: {"description": "refused in the job's state (the detail says why)"},
}


@router.post("/jobs/{job_id}/cancel", responses=REFUSALS)
def cancel_job(job_id: JobId, sender: SenderFor) -> ControlAnswer:
    """Cancel a job: a queued one at once, a running one at its next denoising step or stage.

    Both end with the `cancelled` callback, nothing uploaded. A job that already ended
    (completed, failed) is refused with 409.
    """
    return _answer(cancel(get_records(), job_id, sender=sender))


@router.post("/jobs/{job_id}/retry", responses=REFUSALS)
def retry_job(
    job_id: JobId, sender: SenderFor, options: RetryOptions | None = None
) -> ControlAnswer:
    """Send a failed or cancelled job again from the stage it stopped at, with new task ids.

    A running or completed job is refused with 409 unless `force`. An undelivered final
    callback is sent again; nothing else runs.
    """
    options = options or RetryOptions()
    return _answer(retry(get_records(), job_id, sender=sender, from_start=options.from_start,
                         force=options.force))  # fmt: skip


def _answer(answer: Answer) -> ControlAnswer:
    if answer.outcome is Outcome.NOT_FOUND:
        raise HTTPException(status.HTTP_404_NOT_FOUND, answer.message)
    if answer.outcome is Outcome.REFUSED:
        raise HTTPException(status.HTTP_409_CONFLICT, answer.message)
    return ControlAnswer(job_id=answer.job_id, status=answer.status, message=answer.message)
