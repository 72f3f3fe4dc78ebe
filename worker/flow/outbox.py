"""The outbox of final callbacks: a job that ends always tells the platform, once.

A final status and its callback's intent are written in one step (`callback_pending`: the
status whose callback is due, `callback_pending_at`: since when, Redis time); then the
callback is handed to the broker and the intent cleared. Every writer of a final status
does this: a stage's failure handler, a cancel, the lost-job sweep's last delivery, an
operator's retry of an undelivered callback. The job stays in the index of active jobs
(`wan:jobs:active`) until its final callback is delivered or given up.

The lost-job sweep (`FinalCallbackSweep`, each media worker every fifth of
LOST_JOB_TIMEOUT_S) reads only the active jobs and sends again, atomically on the
record so that of several sweepers one sends:
- an intent older than LOST_JOB_TIMEOUT_S: its publish failed (a broker outage longer than
  the publish retries) or its sender died before sending it;
- a final callback whose worker died whole: its lease not renewed for LOST_JOB_TIMEOUT_S,
  like any stage (`lost_jobs.lost_stage`), counting one more delivery of `callback`.

Exactly once as far as the record can tell: a callback whose delivery is noted in the record
(`callback_sent:<status>`, `finished:callback`) is never sent again, and two copies of one
callback never run at once (the stage's lease).
"""

from __future__ import annotations

import logging
from typing import Literal

import redis
from kombu.exceptions import OperationalError

from worker import faults
from worker.flow.sender import Sender
from worker.jobs.records import FINAL_STATUSES, JobRecord, JobRecords, final_callback_task_id

log = logging.getLogger(__name__)

#: What an active job's final callback needs now: `none` (delivered, or none due: the job
#: runs), `waiting` (in a queue, running, or between retries), `unsent` (its intent is
#: older than the timeout) or `lost` (its worker died whole).
Outstanding = Literal["none", "waiting", "unsent", "lost"]

#: Atomically: drop the intent once its callback is with the broker, unless a newer one was
#: written since. KEYS: the record; ARGV: `callback_pending_at` as read.
_CLEAR_SCRIPT = """
if redis.call('HGET', KEYS[1], 'callback_pending_at') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'callback_pending', 'callback_pending_at')
return 1
"""

#: Atomically: claim sending a final callback again, if the record (status, run, intent and
#: the callback's lease owner as read) is still as the sweeper read it and the callback was
#: not delivered since. A dead worker's lease is dropped and counts one more delivery. The
#: claim is a new intent: a sweeper that dies before sending leaves it for a later sweep.
#: KEYS: the record; ARGV: status, run, `callback_pending_at` ('' for none), lease owner
#: ('' for none), record TTL. 1 if claimed.
_CLAIM_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[1], 'retries') or '0') ~= ARGV[2] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'finished:callback') == 1 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'callback_sent:' .. ARGV[1]) == 1 then return 0 end
if (redis.call('HGET', KEYS[1], 'callback_pending_at') or '') ~= ARGV[3] then return 0 end
if (redis.call('HGET', KEYS[1], 'lease:callback') or '') ~= ARGV[4] then return 0 end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[1], 'lease:callback', 'lease_until:callback', 'lease_pidns:callback')
  redis.call('HINCRBY', KEYS[1], 'deliveries:callback', 1)
  redis.call('HSET', KEYS[1], 'lost:callback', now)
end
redis.call('HSET', KEYS[1], 'callback_pending', ARGV[1], 'callback_pending_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def publish(
    records: JobRecords, job_id: str, status: str, *, sender: Sender, fault_point: str = ""
) -> bool:
    """Hand the due final callback of `status` to the broker (through `sender`), then clear
    its intent; False when none of that status is due (another sender was first). A broker
    error is raised, the intent kept: the sweep sends it within LOST_JOB_TIMEOUT_S if no one
    else does.

    `fault_point`: where WAN_TEST_FAULT may refuse this publish (a test's broker outage).
    """
    key = records.key(job_id)
    run, pending, pending_at = records.redis.hmget(key, "retries", "callback_pending",
                                                   "callback_pending_at")  # fmt: skip
    if pending is None or pending.decode() != status:
        return False
    if fault_point:
        faults.hit(fault_point, job_id)
    task_id = final_callback_task_id(job_id, status, int(run or 0))
    sender.final_callback(job_id, status, task_id=task_id)
    records.redis.register_script(_CLEAR_SCRIPT)(keys=[key], args=[pending_at])
    return True


def send(
    records: JobRecords, job_id: str, status: str, *, sender: Sender, fault_point: str = ""
) -> bool:
    """`publish`, leaving a callback the broker refused to the sweep: False when not sent."""
    try:
        return publish(records, job_id, status, sender=sender, fault_point=fault_point)
    except (OperationalError, redis.RedisError) as e:
        log.warning("job=%s %s callback not handed to the broker: %s: %s; the lost-job sweep "
                    "sends it within LOST_JOB_TIMEOUT_S", job_id, status, type(e).__name__,
                    e)  # fmt: skip
        return False


def outstanding(record: JobRecord, *, now: float, timeout_s: float, lease_s: float) -> Outstanding:
    """What the final callback of an active job needs at `now` (Redis time)."""
    fields = record.fields
    status = record.status
    if (
        status not in FINAL_STATUSES
        or "finished:callback" in fields
        or f"callback_sent:{status}" in fields
    ):
        return "none"
    if "callback_pending" in fields:
        waited_s = now - float(fields["callback_pending_at"])
        return "unsent" if waited_s >= timeout_s else "waiting"
    if "lease:callback" in fields:
        lease_until = float(fields["lease_until:callback"])
        renewed = lease_until - lease_s  # the last renewal (or the start) of the lease
        return "lost" if now >= max(lease_until, renewed + timeout_s) else "waiting"
    return "waiting"


class FinalCallbackSweep:
    """Sends the final callbacks of the outbox that are unsent or lost (through `sender`);
    one pass per call."""

    def __init__(
        self, records: JobRecords, *, sender: Sender, timeout_s: float, lease_s: float
    ) -> None:
        self.records = records
        self.sender = sender
        self.timeout_s = timeout_s
        self.lease_s = lease_s

    def sweep(self) -> list[str]:
        """One pass over the active jobs (not every record): the job ids whose final
        callback was sent again."""
        now = self.records.now()
        sent = []
        for record, _ in self.records.active():
            need = outstanding(record, now=now, timeout_s=self.timeout_s, lease_s=self.lease_s)
            if need in ("unsent", "lost") and self.resend(record, lost=need == "lost", now=now):
                sent.append(record.job_id)
        return sent

    def resend(self, record: JobRecord, *, lost: bool, now: float) -> bool:
        """Claim the callback on the record, then send it; False if another sweeper, or the
        callback itself, moved on first."""
        fields = record.fields
        status = record.status or ""
        owner = fields["lease:callback"] if lost else ""
        claimed = self.records.redis.register_script(_CLAIM_SCRIPT)(
            keys=[self.records.key(record.job_id)],
            args=[status, fields.get("retries", "0"), fields.get("callback_pending_at", ""),
                  owner, self.records.ttl_s],
        )  # fmt: skip
        if not claimed:
            return False
        if lost:
            silent_s = now - (float(fields["lease_until:callback"]) - self.lease_s)
            why = f"lost: {owner} on host {fields.get('host:callback', '')} silent for"
        else:
            silent_s = now - float(fields["callback_pending_at"])
            why = "never handed to the broker, due for"
        log.warning("job=%s final callback %s %s %.0f s (LOST_JOB_TIMEOUT_S=%g): sent again",
                    record.job_id, status, why, silent_s, self.timeout_s)  # fmt: skip
        return send(self.records, record.job_id, status, sender=self.sender)
