"""GET /ui/jobs/{id}?token=...: one job, live, for a person (the platform embeds it).

Server-rendered from the job record, then kept live by a small script (`static/job.js`)
on the browser's `EventSource`: stage, progress bar and ETA from the job's event stream,
the newest preview as it is announced, and at the end the result (video or image, and the
thumbnail) or the error, read again from `GET /ui/jobs/{id}/state`. A browser cannot send
the API key, so the page and everything it loads take the job's watch token (`?token=`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from worker.api.events import ENDING_STATUSES
from worker.api.paths import JobId
from worker.api.ui import PAGE_HEADERS, templates
from worker.api.watch import Watching
from worker.jobs.records import JobRecord, get_records

router = APIRouter(tags=["pages"], include_in_schema=False)


class PageState(BaseModel):
    """What the job page shows, from the job record alone."""

    job_id: str
    job_type: str | None
    content_type: Literal["video", "image"] | None
    prompt: str | None
    #: What WAN received instead of `prompt`, when the enhancement was applied.
    enhanced_prompt: str | None
    status: str | None
    #: The running (or next) stage; none once the job ended.
    stage: str | None
    percent: float | None
    eta_seconds: float | None
    error: str | None
    #: Paths on this API (add the page's token); set once the files are uploaded.
    result_url: str | None
    thumbnail_url: str | None
    frames: int | None
    fps: int | None


def page_state(job_id: str, record: JobRecord) -> PageState:
    job = record.job if "job" in record.fields else None
    progress = record.value("progress") or {}
    generation = record.value("generation") or {}
    uploaded = bool(record.value("uploaded"))
    return PageState(
        job_id=job_id,
        job_type=record.fields.get("job_type"),
        content_type=job.content_type if job else None,
        prompt=job.prompt if job else None,
        enhanced_prompt=(record.value("enhancement") or {}).get("enhanced_prompt"),
        status=record.status,
        stage=None if record.status in ENDING_STATUSES else record.fields.get("stage") or None,
        percent=progress.get("percent"),
        eta_seconds=progress.get("eta_seconds"),
        error=record.fields.get("error"),
        result_url=f"/jobs/{job_id}/result" if uploaded else None,
        thumbnail_url=f"/jobs/{job_id}/thumbnail" if uploaded else None,
        frames=generation.get("frame_num") or (job.frames if job else None),
        fps=job.fps if job else None,
    )


@router.get("/ui/jobs/{job_id}", dependencies=[Watching], response_class=HTMLResponse)
def job_page(
    request: Request, job_id: JobId, token: Annotated[str | None, Query()] = None
) -> HTMLResponse:
    state = page_state(job_id, get_records().get(job_id))
    return templates.TemplateResponse(
        request, "job.html", {"state": state, "token": token or ""}, headers=PAGE_HEADERS
    )


@router.get("/ui/jobs/{job_id}/state", dependencies=[Watching])
def job_page_state(job_id: JobId) -> PageState:
    """The page's data again, for its script (the enhanced prompt, the result, the error)."""
    return page_state(job_id, get_records().get(job_id))
