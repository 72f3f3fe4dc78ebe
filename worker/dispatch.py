"""Turning one validated job into its Celery chain, once; shared by the bridge and the API.

The job record is the memory of what was sent: a job id seen before starts nothing new.
A job id is claimed first (an owner and a lease, atomically in Redis): two dispatchers
given the same id (two bridges, a bridge and the API) never both send it, and a claim
whose owner died is taken over once its lease has run out.
"""

from __future__ import annotations

import logging

from worker import outbox
from worker.job_control import CALLBACK_PUBLISH
from worker.jobs import Job
from worker.lanes import WaitingJobs
from worker.records import JobRecords
from worker.settings import get_settings

log = logging.getLogger(__name__)


def seen_before(records: JobRecords, job_id: str) -> bool:
    """Claim the job id for `records.owner`; True when it must not be sent by this caller.

    That is when it was dispatched (or rejected) before, or when another owner claimed it
    within its lease and is still working on it. False means the caller holds the claim
    and goes on with `submit` or `reject`.
    """
    outcome = records.claim(job_id)
    if outcome == "dispatched":
        log.warning("job=%s seen before: ignored", job_id)
    elif outcome == "held":
        log.warning(
            "job=%s is being dispatched by %s: ignored", job_id, records.claim_owner(job_id)
        )
    return outcome != "claimed"


def submit(records: JobRecords, job: Job, *, payload: str) -> None:
    """Write the record of a claimed job, send its chain and mark it dispatched."""
    send(records, job, payload=payload)
    mark_dispatched(records, job)


def send(records: JobRecords, job: Job, *, payload: str) -> None:
    """Write the record of a claimed job and send its chain (not yet marked dispatched)."""
    from tasks import build_chain  # Celery's app is needed only once a job arrives

    if job.frames != job.frames_requested:
        log.info("job=%s frames %d normalised to %d", job.id, job.frames_requested, job.frames)
    records.create(job, payload=payload)
    priority = WaitingJobs(records.redis, get_settings()).enter(job)
    build_chain(job.id, priority=priority).apply_async()


def mark_dispatched(records: JobRecords, job: Job) -> None:
    """Close the claim: from now on the job id starts nothing new."""
    records.mark_dispatched(job.id)
    log.info("job=%s %s dispatched", job.id, job.type.value)


def reject(
    records: JobRecords, job_id: str, *, job_type: str, payload: str, error: Exception
) -> None:
    """Record a claimed job as failed and send its `failed` callback through the media queue.

    The record is marked dispatched only once the callback is published: a broker error in
    between leaves the claim open, so the caller's next attempt sends the callback again
    (and the record says the callback is due, for the lost-job sweep: worker/outbox.py).
    """
    records.write(job_id, payload=payload, job_type=job_type)
    records.fail(job_id, stage="validate", error=error)
    outbox.publish(records, job_id, "failed", fault_point=CALLBACK_PUBLISH)
    records.mark_dispatched(job_id)
