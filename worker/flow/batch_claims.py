"""Taking waiting image jobs into a batch: the waiting jobs in the order the generation
workers take them, and the claim of each on its record.

The claim is the start of the job's generate stage, done by the batch's process in one
Redis step (as `JobRecords.begin_stage` does for a delivered message, and only for a job
still waiting: queued, its generate stage never started, not cancelled, of the run whose
message waits). The job's own generate message stays in the queue; when a worker takes it,
its stage start finds the batch's live lease (`busy`: it waits), the stage finished
(`done`: skipped, and its chain goes on to its media stages) or the lease of a dead batch
(the job runs alone, one delivery more), so a job claimed by a batch whose worker died is
recovered as any lost generation is. Two workers never claim one job: the second finds the
first's lease.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.flow.lanes import GENERATE_TASK, GPU_QUEUE, KEY_PREFIX, priority_lists
from worker.jobs.model import Job
from worker.jobs.records import JobRecords, _pid_namespace, lease_owner, run_of_task

#: How many waiting messages a batch looks through, from the head of the queue.
LOOK_AHEAD = 200

#: Atomically: start the generate stage of a waiting job for a batch. KEYS: the record; ARGV:
#: owner, lease seconds, record TTL, pid namespace, WORKER_HOST, the run of its waiting
#: message, batch id. 1 if claimed.
_CLAIM_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if (redis.call('HGET', KEYS[1], 'retries') or '0') ~= ARGV[6] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'started:generate') == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local at = string.format('%.6f', now)
redis.call('HSET', KEYS[1], 'lease:generate', ARGV[1],
           'lease_until:generate', string.format('%.6f', now + tonumber(ARGV[2])),
           'lease_pidns:generate', ARGV[4], 'stage', 'generate', 'started:generate', at,
           'first_started:generate', at, 'host:generate', ARGV[5], 'deliveries:generate', 1,
           'attempts:generate', 1, 'batch:generate', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class WaitingJob:
    """A job whose generate message waits in the GPU queue."""

    job: Job
    #: Its prompt as WAN would receive it: the enhanced one, if the job was enhanced.
    prompt: str
    #: The run of the chain its message belongs to.
    run: int
    #: Seconds since it was sent (Redis time), what PROMOTE_AFTER_S is counted against.
    waited_s: float
    #: The batch that claimed it, if one has.
    batch: str | None = None


def waiting_in_take_order(records: JobRecords, *, look_ahead: int = LOOK_AHEAD) -> list[WaitingJob]:
    """The waiting jobs, first taken first: the GPU queue's priority lists in step order,
    each oldest first (kombu pops a list's right end)."""
    client = records.redis
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(GPU_QUEUE):
            pipe.lrange(name, -look_ahead, -1)
        lists = pipe.execute()
    order: dict[str, int] = {}  # job id -> run of its waiting message
    for raws in lists:
        for raw in reversed(raws):
            task_id = _generate_task_id(raw)
            job_id = task_id.split(":")[0] if task_id else None
            if job_id is not None and job_id not in order:
                run = run_of_task(task_id, job_id, "generate")
                if run is not None:
                    order[job_id] = run
    with client.pipeline(transaction=False) as pipe:
        for job_id in order:
            pipe.hmget(records.key(job_id), "job", "enhancement", "batch:generate")
        found = [(job_id, raw, enhancement, batch)
                 for job_id, (raw, enhancement, batch) in zip(order, pipe.execute(), strict=True)
                 if raw is not None]  # fmt: skip
    jobs = [Job.model_validate_json(raw) for _, raw, _, _ in found]
    now = records.now()
    with client.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.zscore(f"{KEY_PREFIX}{job.content_type}", job.id)
        sent = pipe.execute()
    waiting = []
    for job, (job_id, _, enhancement, batch), sent_at in zip(jobs, found, sent, strict=True):
        enhanced = json.loads(enhancement).get("enhanced_prompt") if enhancement else None
        waited_s = 0.0 if sent_at is None else max(0.0, now - sent_at)
        waiting.append(WaitingJob(job, enhanced or job.prompt, order[job_id], waited_s,
                                  batch.decode() if batch else None))  # fmt: skip
    return waiting


def claim(
    records: JobRecords, waiting: WaitingJob, *, batch_id: str, lease_s: float, host: str
) -> bool:
    """Start `waiting`'s generate stage for the batch `batch_id`, held by this process's
    lease; False if it is not waiting any more (taken, cancelled, sent again)."""
    script = records.redis.register_script(_CLAIM_SCRIPT)
    claimed = script(
        keys=[records.key(waiting.job.id)],
        args=[lease_owner(), lease_s, records.ttl_s, _pid_namespace(), host, waiting.run,
              batch_id],
    )  # fmt: skip
    return bool(claimed)


def _generate_task_id(raw: bytes) -> str | None:
    """The task id of a generate message as kombu keeps it on Redis; None for another."""
    try:
        headers = json.loads(raw)["headers"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(headers["id"]) if headers.get("task") == GENERATE_TASK else None
