"""GET /jobs/{id}/preview: the newest live preview of a generating job, as WEBP.

What a `preview` event's URL points at (the query names the step it announced; the answer is
always the newest, its step in `X-Preview-Step`). Kept in Redis a short while only
(`worker.observe.preview_store`); never a result, never cached by the browser.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import Response
from redis.exceptions import RedisError

from worker.api.paths import JobId
from worker.api.watch import REFUSED, Watching
from worker.jobs.records import get_records
from worker.observe import preview_store

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}/preview",
    dependencies=[Watching],
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}}},
        404: {"description": "no preview: none made yet, previews off, or expired"},
        503: {"description": "Redis unreachable"},
        **REFUSED,
    },
)
def job_preview(job_id: JobId) -> Response:
    try:
        preview = preview_store.latest(get_records().redis, job_id)
    except RedisError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Redis unreachable: {e}") from e
    if preview is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no preview of job {job_id}")
    headers = {
        "Cache-Control": "no-store",
        "X-Preview-Step": str(preview.step),
        "X-Preview-Total-Steps": str(preview.total_steps),
    }
    if preview.window is not None:
        headers["X-Preview-Window"] = str(preview.window)
    return Response(preview.webp, media_type="image/webp", headers=headers)
