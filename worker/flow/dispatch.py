"""Turning one validated job into its Celery chain, once; shared by the bridge and the API.

The job record is the memory of what was sent: a job id seen before starts nothing new.
A job id is claimed first (an owner and a lease, atomically in Redis): two dispatchers
given the same id (two bridges, a bridge and the API) never both send it, and a claim
whose owner died is taken over once its lease (CLAIM_LEASE_S) has run out. Until then a
job held by another owner is not forgotten: the bridge keeps its item and asks again, the
API answers 409 with the seconds left.
"""

from __future__ import annotations

import logging

from worker.flow import outbox
from worker.flow.job_control import CALLBACK_PUBLISH
from worker.flow.lanes import WaitingJobs
from worker.flow.sender import Sender
from worker.jobs.model import Job
from worker.jobs.records import Claim, JobRecords
from worker.settings import get_settings

log = logging.getLogger(__name__)


def claim(records: JobRecords, job_id: str, *, quiet: bool = False) -> Claim:
    """Claim the job id for `records.owner`.

    `claimed`: the caller goes on with `submit` or `reject`. `dispatched`: sent (or
    answered) before, nothing to do. `held`: another owner claimed it within its lease and
    may be sending it, or may have died before it could: the caller must not drop the job,
    but ask again until it is dispatched or the claim has run out (`claim_left_s`).
    `quiet`: the caller asked before and was told; only a change is logged.
    """
    outcome = records.claim(job_id)
    if outcome == "dispatched":
        log.warning("job=%s seen before: ignored", job_id)
    elif outcome == "held" and not quiet:
        log.warning(
            "job=%s is being dispatched by %s: kept until it is dispatched, or its claim "
            "runs out in %.0f s",
            job_id,
            records.claim_owner(job_id),
            claim_left_s(records, job_id),
        )
    return outcome


def claim_left_s(records: JobRecords, job_id: str) -> float:
    """Seconds until the claim on the job id runs out, on Redis's clock (0 once it has)."""
    expires = records.redis.hget(records.key(job_id), "claim_expires_at")
    return max(0.0, float(expires or 0) - records.now())


def submit(records: JobRecords, job: Job, *, payload: str, sender: Sender) -> None:
    """Write the record of a claimed job, send its chain and mark it dispatched."""
    send(records, job, payload=payload, sender=sender)
    mark_dispatched(records, job)


def send(records: JobRecords, job: Job, *, payload: str, sender: Sender) -> None:
    """Write the record of a claimed job and send its chain (not yet marked dispatched)."""
    if job.frames != job.frames_requested:
        log.info("job=%s frames %d normalised to %d", job.id, job.frames_requested, job.frames)
    records.create(job, payload=payload)
    priority = WaitingJobs(records.redis, get_settings()).enter(job)
    sender.chain(job.id, priority=priority)


def mark_dispatched(records: JobRecords, job: Job) -> None:
    """Close the claim: from now on the job id starts nothing new."""
    records.mark_dispatched(job.id)
    log.info("job=%s %s dispatched", job.id, job.type.value)


def reject(
    records: JobRecords,
    job_id: str,
    *,
    job_type: str,
    payload: str,
    error: Exception,
    sender: Sender,
) -> None:
    """Record a claimed job as failed and send its `failed` callback through the media queue.

    The record is marked dispatched only once the callback is published: a broker error in
    between leaves the claim open, so the caller's next attempt sends the callback again
    (and the record says the callback is due, for the lost-job sweep: worker/flow/outbox.py).
    """
    records.write_active(job_id, payload=payload, job_type=job_type)  # owes a callback
    records.fail(job_id, stage="validate", error=error)
    outbox.publish(records, job_id, "failed", sender=sender, fault_point=CALLBACK_PUBLISH)
    records.mark_dispatched(job_id)
