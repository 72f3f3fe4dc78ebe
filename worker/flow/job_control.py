"""What an operator or the platform can do to a job: cancel it, send it again.

Shared by `POST /jobs/{id}/cancel|retry` and `celery -A tasks jobs cancel|retry`; each
answers an `Outcome` that the API turns into a status code and the CLI into an exit code.

Cancel is a flag in the job record (`cancel_requested_at`). A job still `queued` is
cancelled at once: its `cancelled` callback goes out now, and any of its stages that comes
up later stops before doing anything. A job past that point is stopped by the worker: at
the next denoising step (the step hook raises, so the VAE never decodes) or before its next
stage, and the worker sends the callback. The final callback itself is never stopped: a
cancel that comes once the files are uploaded is too late, and the job completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from worker.clock import redis_stamp
from worker.errors import JobCancelled
from worker.flow import outbox
from worker.flow.lanes import WaitingJobs, leave_waiting
from worker.flow.sender import Sender
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import ACTIVE_KEY, STAGES, JobRecord, JobRecords, get_records
from worker.observe.metrics import CANCELLATIONS, DEAD_LETTERS, Metrics
from worker.settings import get_settings


class Outcome(Enum):
    """How a request ended; the value is the CLI's exit code."""

    DONE = 0
    NOT_FOUND = 1
    REFUSED = 2


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    job_id: str
    #: The job's status after the request, None when there is no such job.
    status: str | None
    message: str


#: Where WAN_TEST_FAULT may refuse a final callback's first publish (worker/faults.py).
CALLBACK_PUBLISH = "callback_publish"

#: Statuses of a job that is still on its way (a cancel is taken, a retry is refused).
RUNNING_STATUSES = frozenset({"queued", "processing"})

#: Atomically: decide what a cancel request does. KEYS: the record, the index of active
#: jobs (a job owing a callback stays in it); ARGV: now, the job id. `missing`, `cancelled`
#: (before), `refused:<status>`, `stopped` (a queued job, cancelled here with its callback
#: due: the caller sends it) or `requested` (the worker stops it).
_CANCEL_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'cancelled' then return 'cancelled' end
if status ~= 'queued' and status ~= 'processing' then return 'refused:' .. status end
redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[1])
if status == 'queued' and redis.call('HSETNX', KEYS[1], 'cancelled_at', ARGV[1]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  redis.call('ZADD', KEYS[2], 'NX', now, ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_stage', 'queued',
             'callback_pending', 'cancelled', 'callback_pending_at', string.format('%.6f', now))
  return 'stopped'
end
return 'requested'
"""

#: What each stage leaves in the record; a retry from a stage clears it and what follows.
STAGE_OUTPUTS = {
    "enhance": ("enhancement",),
    "generate": ("generation", "progress"),
    "encode": ("output",),
    "thumbnail": ("thumbnail",),
    "upload": ("uploaded",),
    "callback": ("final_callback",),
}
DELIVERY_ERROR_FIELDS = ("delivery_error", "delivery_error_stage", "delivery_error_type")
#: Per-stage fields of the record (`attempts:generate`, ...): a retried stage starts afresh,
#: its deliveries and lease included.
STAGE_BOOKKEEPING = (
    "attempts", "started", "finished", "first_started",
    "deliveries", "lease", "lease_until", "lease_pidns", "handed_back", "host",
)  # fmt: skip
#: What says how a job ended; a retry clears it (the job's history stays in `retries`).
OUTCOME_FIELDS = (
    "error", "error_stage", "error_type", *DELIVERY_ERROR_FIELDS,
    "cancel_requested_at", "cancelled_at", "cancelled_stage", "cancelled_progress",
)  # fmt: skip


def cancel(records: JobRecords, job_id: str, *, sender: Sender) -> Answer:
    """Cancel a job: at once if it is queued (`sender` sends its callback), else at its next
    step or stage."""
    script = records.redis.register_script(_CANCEL_SCRIPT)
    decision = script(
        keys=[records.key(job_id), ACTIVE_KEY], args=[redis_stamp(records.redis), job_id]
    ).decode()
    if decision == "missing":
        return Answer(Outcome.NOT_FOUND, job_id, None, f"no job {job_id}")
    if decision.startswith("refused:"):
        status = decision.removeprefix("refused:")
        return Answer(
            Outcome.REFUSED, job_id, status, f"job {job_id} is {status}: too late to cancel"
        )
    if decision == "stopped":
        leave_waiting(records, get_settings(), job_id)
        Metrics(records.redis).count(CANCELLATIONS)
        send_final_callback(job_id, "cancelled", sender=sender, records=records)
        return Answer(
            Outcome.DONE, job_id, "cancelled", f"job {job_id} cancelled before it started"
        )
    if decision == "cancelled":
        return Answer(Outcome.DONE, job_id, "cancelled", f"job {job_id} was cancelled before")
    return Answer(
        Outcome.DONE,
        job_id,
        records.get(job_id).status,
        f"job {job_id} will stop at its next step or stage",
    )


def raise_if_cancelled(records: JobRecords, job_id: str) -> None:
    """The one check every stage and every denoising step makes."""
    if records.redis.hexists(records.key(job_id), "cancel_requested_at"):
        raise JobCancelled(f"job {job_id} was cancelled")


def finish_cancelled(records: JobRecords, job_id: str, *, stage: str) -> bool:
    """Leave the record saying the job is cancelled, where, and how far it got (the progress
    event of then: later stages overwrite `progress`); True for the one caller that must
    send the `cancelled` callback (a queued job's canceller may have sent it already)."""
    key = records.key(job_id)
    if not records.redis.hsetnx(key, "cancelled_at", redis_stamp(records.redis)):
        records.write(job_id, status="cancelled")
        return False
    progress = (records.redis.hget(key, "progress") or b"{}").decode()
    records.write(job_id, status="cancelled", cancelled_stage=stage, cancelled_progress=progress,
                  **records.final_callback_due(job_id, "cancelled"))  # fmt: skip
    Metrics(records.redis).count(CANCELLATIONS)
    return True


def send_final_callback(
    job_id: str, status: str, *, sender: Sender, records: JobRecords | None = None
) -> bool:
    """Queue (through `sender`) the final callback that the record says is due
    (`JobRecords.final_callback_due`, written with the final status) on the media workers;
    False when the broker refused it: the lost-job sweep sends it within LOST_JOB_TIMEOUT_S
    (worker/flow/outbox.py)."""
    return outbox.send(records or get_records(), job_id, status, sender=sender,
                       fault_point=CALLBACK_PUBLISH)  # fmt: skip


def give_up(records: JobRecords, job_id: str) -> None:
    """Put a job given up on for good (too many deliveries) in the dead letters, counted once
    in the metrics; `retry` takes it out again."""
    if DeadLetters(records.redis).add(job_id):
        Metrics(records.redis).count(DEAD_LETTERS)


def retry(
    records: JobRecords,
    job_id: str,
    *,
    sender: Sender,
    from_start: bool = False,
    force: bool = False,
) -> Answer:
    """Send a job again (through `sender`) from the stage it stopped at (or from the start)
    with new task ids.

    Refuses a job that is running or completed unless `force`, and one that never passed
    validation. A job whose final callback was not delivered gets that callback again;
    nothing else runs. A retried job leaves the dead letters.
    """
    record = records.get(job_id)
    if record.status is None:
        return Answer(Outcome.NOT_FOUND, job_id, None, f"no job {job_id}")
    if refusal := _retry_refusal(record, force=force):
        return Answer(Outcome.REFUSED, job_id, record.status, f"job {job_id} {refusal}")
    run = int(record.fields.get("retries", 0)) + 1
    if record.status == "delivery_failed" and not from_start:
        stage, outcome = "callback", _outcome(record)
        # The callback's attempts start afresh: a new delivery window and deliveries.
        callback_bookkeeping = [f"{kind}:callback" for kind in STAGE_BOOKKEEPING]
        records.redis.hdel(records.key(job_id), *DELIVERY_ERROR_FIELDS, *callback_bookkeeping)
        records.write_active(job_id, status=outcome, retries=str(run), retried_from=stage,
                             **records.final_callback_due(job_id, outcome))  # fmt: skip
        send_final_callback(job_id, outcome, sender=sender, records=records)
    else:
        stage = "enhance" if from_start else _restart_stage(record)
        _reset(records, record, stage, run)
        priority = None  # a tail after generate (the final callback) waits in no lane
        if STAGES.index(stage) <= STAGES.index("generate"):
            priority = WaitingJobs(records.redis, get_settings()).enter(record.job)
        sender.chain(job_id, from_stage=stage, run=run, priority=priority)
    DeadLetters(records.redis).remove(job_id)
    status = records.get(job_id).status
    return Answer(
        Outcome.DONE, job_id, status, f"job {job_id} sent again from {stage} (retry {run})"
    )


def _retry_refusal(record: JobRecord, *, force: bool) -> str | None:
    """Why a retry is refused, or None."""
    if "job" not in record.fields:
        return (
            f"never passed validation ({record.fields.get('error')}): "
            "the platform must send it again, corrected"
        )
    if not force and (record.status in RUNNING_STATUSES or record.status == "completed"):
        return f"is {record.status}: not sent again without force"
    return None


def _outcome(record: JobRecord) -> str:
    """The final status whose callback was not delivered."""
    if "cancelled_at" in record.fields:
        return "cancelled"
    return "failed" if "error" in record.fields else "completed"


def _restart_stage(record: JobRecord) -> str:
    """Where the job stopped; a media stage restarts at generate, as the job's spool (its
    frames and files) was emptied when it stopped. The seed in the record is kept."""
    fields = record.fields
    stopped = fields.get("error_stage") or fields.get("cancelled_stage") or fields.get("stage")
    if record.status == "completed" or stopped not in STAGES:
        return "enhance"
    if stopped in ("encode", "thumbnail", "upload"):
        return "generate"
    return stopped


def run_again_fields(record: JobRecord, stage: str) -> list[str]:
    """What a run of the job from `stage` forgets: the outcome and what the stages from
    `stage` on did, deliveries included."""
    later = STAGES[STAGES.index(stage) :]
    stale = [*OUTCOME_FIELDS, *(name for s in later for name in STAGE_OUTPUTS[s])]
    stale += [f"{kind}:{s}" for s in later for kind in STAGE_BOOKKEEPING]
    # a lost-job resend's, a final callback's due: this run replaces them
    stale += ["resend_pending", "callback_pending", "callback_pending_at"]
    return stale + [name for name in record.fields if name.startswith("callback_sent:")]


def _reset(records: JobRecords, record: JobRecord, stage: str, run: int) -> None:
    """Forget the outcome and what the stages from `stage` on did, deliveries included; the
    job is active again (`ACTIVE_KEY`) from now, in the same step."""
    now = records.now()
    with records.redis.pipeline() as pipe:
        pipe.hdel(records.key(record.job_id), *run_again_fields(record, stage))
        pipe.hset(
            records.key(record.job_id),
            mapping={"status": "queued", "stage": "", "retries": str(run), "retried_from": stage},
        )
        pipe.expire(records.key(record.job_id), records.ttl_s)
        pipe.zadd(ACTIVE_KEY, {record.job_id: now})
        pipe.execute()
