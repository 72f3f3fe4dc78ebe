"""Turning one validated job into its Celery chain, once; shared by the bridge and the API.

The job record is the memory of what was sent: a job id seen before starts nothing new.
"""

from __future__ import annotations

import logging

from worker.jobs import Job
from worker.records import JobRecords

log = logging.getLogger(__name__)


def seen_before(records: JobRecords, job_id: str) -> bool:
    """Claim the job id; True when it was already dispatched (or rejected) before."""
    # Claimed but never dispatched: a bridge died in between, so this job is sent now.
    if not records.claim(job_id) and records.is_dispatched(job_id):
        log.warning("job=%s seen before: ignored", job_id)
        return True
    return False


def submit(records: JobRecords, job: Job, *, payload: str) -> None:
    """Write the record of a claimed job and send its chain."""
    from tasks import build_chain  # Celery's app is needed only once a job arrives

    if job.frames != job.frames_requested:
        log.info("job=%s frames %d normalised to %d", job.id, job.frames_requested, job.frames)
    records.create(job, payload=payload)
    build_chain(job.id).apply_async()
    records.mark_dispatched(job.id)
    log.info("job=%s %s dispatched", job.id, job.type.value)


def reject(
    records: JobRecords, job_id: str, *, job_type: str, payload: str, error: Exception
) -> None:
    """Record an invalid job and send its `failed` callback through the media queue."""
    from tasks.media import callback

    records.write(job_id, payload=payload, job_type=job_type)
    records.mark_dispatched(job_id)
    records.fail(job_id, stage="validate", error=error)
    callback.apply_async((job_id, "failed"), task_id=f"{job_id}:callback:failed")
