"""The CPU stages: encode, thumbnail, upload, callback. Nothing here imports torch."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from celery.utils.log import get_task_logger

from media import spool
from media.checks import check_file
from media.encode import encode_mp4, write_png
from media.storage import Storage, make_storage
from media.thumbnail import make_thumbnail, middle_frame
from tasks.app import app
from tasks.base import DeliveryTask, StageTask
from worker import faults
from worker.errors import FramesMissing
from worker.flow.callback import FINAL_BODIES, CallbackGate, post_callback
from worker.jobs.model import BUCKET
from worker.jobs.records import JobRecord, get_records
from worker.observe.logs import job_summary
from worker.observe.metrics import JOBS, Metrics
from worker.observe.progress import Progress
from worker.settings import get_settings

log = get_task_logger(__name__)

CONTENT_TYPES = {"mp4": "video/mp4", "png": "image/png", "webp": "image/webp"}


def _frames(job_id: str) -> tuple[JobRecord, spool.Frames]:
    """The job's record and its generated frames, from the spool of this host (a long
    video's window by window)."""
    record = get_records().get(job_id)
    generation = record.value("generation") or {}
    path = Path(generation.get("frames_path", ""))
    if not path.is_file() and not (path.is_dir() and spool.windows_written(path)):
        here = get_settings().worker_host
        raise FramesMissing(
            f"the frames of job {job_id} are not in the spool of host {here} ({path}); "
            f"they were written by host {generation.get('host')}: retry the job from generate"
        )
    return record, spool.read_frames(path)


@cache
def _storage() -> Storage:
    """One storage client per worker process, reused across jobs (keeps its connections)."""
    return make_storage(get_settings())


@app.task(base=StageTask, bind=True, name="wan.encode", stage="encode")
def encode(self: StageTask, job_id: str) -> None:
    """H.264 MP4 for videos, PNG for images; checked before anything is uploaded."""
    record, frames = _frames(job_id)
    job = record.job
    out = spool.job_dir(get_settings().spool_dir, job_id) / f"0.{job.extension}"
    if job.type.is_video:
        encode_mp4(frames, out, fps=job.fps)
    else:
        write_png(frames[0], out)
    get_records().update(
        job_id,
        output={
            "path": str(out.resolve()),
            "file_size_bytes": check_file(out, job.extension),
            "duration_seconds": round(len(frames) / job.fps, 2),
            "fps": job.fps,
        },
    )


@app.task(base=StageTask, bind=True, name="wan.thumbnail", stage="thumbnail")
def thumbnail(self: StageTask, job_id: str) -> None:
    """The 256 px WEBP of the middle frame, read from the raw frames (no video decode)."""
    _, frames = _frames(job_id)
    out = make_thumbnail(
        middle_frame(frames), spool.job_dir(get_settings().spool_dir, job_id) / "0.thumb.webp"
    )
    check_file(out, "webp")
    get_records().update(job_id, thumbnail={"path": str(out.resolve())})


@app.task(base=DeliveryTask, bind=True, name="wan.upload", stage="upload")
def upload(self: DeliveryTask, job_id: str) -> None:
    """Both files to storage at paths derived from the job (upsert), then the spool is freed."""
    settings = get_settings()
    records = get_records()
    record = records.get(job_id)
    if record.value("uploaded"):  # a redelivery after the spool was already freed
        return
    job = record.job
    storage = _storage()
    records.confirm_run(job_id)  # a superseded run uploads nothing over the new run's files
    storage.upload(
        BUCKET,
        job.asset_key,
        Path(record.value("output")["path"]),
        content_type=CONTENT_TYPES[job.extension],
    )
    storage.upload(
        BUCKET,
        job.thumbnail_key,
        Path(record.value("thumbnail")["path"]),
        content_type=CONTENT_TYPES["webp"],
    )
    records.update(job_id, uploaded=True)
    spool.remove_job(settings.spool_dir, job_id)


@app.task(
    base=DeliveryTask,
    bind=True,
    name="wan.callback",
    stage="callback",
    reports_failure=False,
    cancellable=False,
)
def callback(self: DeliveryTask, job_id: str, status: str = "completed") -> None:
    """The final signed callback, retried hard; its status is written to the record once the
    platform has answered 2xx (never when no callback URL is configured). No `processing`
    callback of the job goes out after it (`CallbackGate`)."""
    records = get_records()
    settings = get_settings()
    faults.hit("callback_post", job_id)
    records.confirm_run(job_id)  # a superseded run (or a taken-over lease) tells nothing
    CallbackGate(records, settings).close(job_id)
    record = records.get(job_id)
    post_callback(settings, FINAL_BODIES[status](record))
    records.write(job_id, status=status, final_callback=status)
    records.callback_sent(job_id, status)
    log.info("job=%s finished %s", job_id, status, extra={"summary": job_summary(record, status)})
    Metrics(records.redis).count(JOBS, record.fields.get("job_type", ""), status)
    Progress(records, job_id, task=self).final(status)
