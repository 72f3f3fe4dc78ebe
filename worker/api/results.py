"""GET /jobs/{id}/result and /thumbnail: a finished job's file, for the job page to show.

A watch token opens them like the job's stream. The `local` backend's file is served from
OUTPUT_DIR (an API on the host that stores them); Supabase's by a redirect to a signed URL
(the bucket stays private).
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse, Response

from media.storage import LocalStorage, Storage, SupabaseStorage, make_storage
from worker.api.paths import JobId
from worker.api.watch import REFUSED, Watching
from worker.errors import JobError
from worker.jobs.model import BUCKET
from worker.jobs.records import get_records
from worker.settings import get_settings

router = APIRouter(tags=["jobs"])

#: How long a signed URL handed to a browser reads the file, seconds.
SIGNED_URL_S = 3600
RESPONSES = {
    200: {"content": {"video/mp4": {}, "image/png": {}, "image/webp": {}}},
    307: {"description": "to a signed URL of the file (STORAGE_BACKEND=supabase)"},
    404: {"description": "no such job, or its files are not uploaded (yet)"},
    502: {"description": "the storage could not sign a URL"},
    **REFUSED,
}


@cache
def _storage() -> Storage:
    return make_storage(get_settings())


@router.get("/jobs/{job_id}/result", dependencies=[Watching], response_class=Response,
            responses=RESPONSES)  # fmt: skip
def job_result(job_id: JobId) -> Response:
    """The job's video (MP4) or image (PNG)."""
    return _stored_file(job_id, thumbnail=False)


@router.get("/jobs/{job_id}/thumbnail", dependencies=[Watching], response_class=Response,
            responses=RESPONSES)  # fmt: skip
def job_thumbnail(job_id: JobId) -> Response:
    """The job's WEBP thumbnail."""
    return _stored_file(job_id, thumbnail=True)


def _stored_file(job_id: str, *, thumbnail: bool) -> Response:
    record = get_records().get(job_id)
    if not record.value("uploaded") or "job" not in record.fields:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no uploaded files")
    job = record.job
    key = job.thumbnail_key if thumbnail else job.asset_key
    storage = _storage()
    if isinstance(storage, LocalStorage):
        path = storage.path(BUCKET, key)
        if not path.is_file():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"{key} is not in this API's OUTPUT_DIR")
        return FileResponse(path)
    assert isinstance(storage, SupabaseStorage)
    try:
        url = storage.signed_url(BUCKET, key, expires_s=SIGNED_URL_S)
    except JobError as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(e)) from e
    return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
