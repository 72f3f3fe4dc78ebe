"""A Redis that has run a fleet's months: many finished records, and one host's sweep pass.

For the tests and the benchmark of what a sweep costs (never used by production processes).
"""

from __future__ import annotations

import json
import uuid

from worker.flow.lanes import promote_overdue
from worker.flow.leftovers import drop_leftovers
from worker.flow.lost_jobs import LostJobSweep
from worker.flow.reconcile import QueuedJobReconciler
from worker.jobs.model import parse_job
from worker.jobs.records import INDEX_KEY, KEY_PREFIX, STAGES, JobRecords
from worker.settings import Settings

#: Copies of one record, made inside Redis (packing 100,000 hashes in Python takes a minute
#: on a loaded machine). KEYS: the record index; ARGV: the key prefix, the id prefix, the
#: first and last number, the record TTL, when claimed, then the record's fields and values.
_COPY_SCRIPT = """
for n = tonumber(ARGV[3]), tonumber(ARGV[4]) do
  local job_id = ARGV[2] .. n
  redis.call('HSET', ARGV[1] .. job_id, unpack(ARGV, 7))
  redis.call('EXPIRE', ARGV[1] .. job_id, ARGV[5])
  redis.call('ZADD', KEYS[1], ARGV[6], job_id)
end
"""
#: Records one copy script makes: each script runs well under a client's socket timeout.
COPY_BATCH = 2_000


def finished_record(records: JobRecords) -> dict[str, str]:
    """The record a completed job leaves, written by the record code's own steps (claim,
    record, each stage's start and end, the final callback noted), then removed."""
    body = {
        "id": f"finished-{uuid.uuid4()}",
        "type": "image_fast",
        "user_id": "user-1",
        "prompt": "a red fox runs in the snow",
        "config": {"resolution": "256x256"},
    }
    job = parse_job(body)
    records.claim(job.id)
    records.create(job, payload=json.dumps(body))
    for stage in STAGES:
        records.begin_stage(job.id, stage, lease_s=60, max_deliveries=3)
        records.stage_finished(job.id, stage)
    records.write(job.id, status="completed", final_callback="completed")
    records.callback_sent(job.id, "completed")
    fields = records.get(job.id).fields
    records.redis.delete(records.key(job.id))
    records.redis.zrem(INDEX_KEY, job.id)
    return fields


def add_finished(records: JobRecords, fields: dict[str, str], count: int) -> None:
    """`count` copies of a finished record (`done-<n>`), in the record index as every record
    is: one pipeline of copy scripts, a few seconds for 100,000."""
    copy = records.redis.register_script(_COPY_SCRIPT)
    pairs = [part for item in fields.items() for part in item]
    claimed_at = records.now()
    with records.redis.pipeline(transaction=False) as pipe:
        for first in range(0, count, COPY_BATCH):
            last = min(first + COPY_BATCH, count) - 1
            copy(keys=[INDEX_KEY], args=[KEY_PREFIX, "done-", first, last, records.ttl_s,
                                         claimed_at, *pairs], client=pipe)  # fmt: skip
        pipe.execute()


def sweep_pass(records: JobRecords, reconciler: QueuedJobReconciler, settings: Settings) -> None:
    """What one host's sweeps do once (tasks/worker_steps.py): the media worker's lost-job
    sweep (lost jobs, swallowed messages, leftovers) and its generation worker's promotion
    sweep (the lanes' prune)."""
    records.media_heartbeat(settings.worker_host)
    LostJobSweep(records, sender=reconciler.lost_jobs.sender, timeout_s=reconciler.timeout_s,
                 lease_s=settings.stage_lease_s,
                 max_deliveries=settings.max_deliveries).sweep()  # fmt: skip
    reconciler.sweep()
    drop_leftovers(records)
    promote_overdue(records, settings)
