"""Job records: one Redis hash per job, written by the bridge and updated by every stage.

Stages pass only the job id; whatever they need (the job, the seed used, file paths)
is read back from here, so any stage can run again after a crash.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import redis

from worker.jobs import Job
from worker.settings import get_settings

KEY_PREFIX = "wan:job:"
#: Statuses after which the platform expects no more callbacks for a job.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: How long a claim on a job id keeps others off it, seconds. Claim to dispatch takes
#: milliseconds; a claim older than this belongs to a dispatcher that died, and is taken over.
CLAIM_LEASE_S = 300

Claim = Literal["claimed", "dispatched", "held"]

#: Atomically: a dispatched job stays dispatched; a claim of another owner whose lease runs
#: is left alone; otherwise the caller holds the claim for the lease from Redis's own clock
#: (one clock for every host). KEYS: the record; ARGV: owner, lease seconds, record TTL.
_CLAIM_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], 'dispatched_at') == 1 then return 'dispatched' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local owner = redis.call('HGET', KEYS[1], 'claim_owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'claim_expires_at') or '0')
if owner and owner ~= ARGV[1] and now < expires then return 'held' end
redis.call('HSET', KEYS[1], 'claim_owner', ARGV[1],
           'claim_expires_at', string.format('%.6f', now + tonumber(ARGV[2])))
redis.call('HSETNX', KEYS[1], 'claimed_at', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'claimed'
"""


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one record, with typed views of its text fields."""

    job_id: str
    fields: dict[str, str]

    @property
    def job(self) -> Job:
        return Job.model_validate_json(self.fields["job"])

    @property
    def status(self) -> str | None:
        return self.fields.get("status")

    def value(self, name: str) -> Any:
        """A field written by `JobRecords.update`, decoded from JSON; None when absent."""
        text = self.fields.get(name)
        return None if text is None else json.loads(text)

    def first_started(self, stage: str) -> float | None:
        """When the stage's first delivery started (retries and redeliveries keep it)."""
        at = self.fields.get(f"first_started:{stage}")
        return None if at is None else float(at)

    def stage_seconds(self) -> dict[str, float]:
        """Wall time of each finished stage, in chain order of first start."""
        starts = sorted(
            (float(at), name.removeprefix("started:"))
            for name, at in self.fields.items()
            if name.startswith("started:")
        )
        seconds = {}
        for started, stage in starts:
            finished = self.fields.get(f"finished:{stage}")
            if finished is not None:
                seconds[stage] = round(float(finished) - started, 3)
        return seconds


class JobRecords:
    """Reads and writes job records; every write renews the record's expiry.

    `owner` names who claims job ids through this object. A bridge passes one that outlives
    its process (its host's processing list), so after a crash it takes back its own claims
    at once; by default each thread of each process is an owner of its own.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int,
        owner: str | None = None,
        claim_lease_s: float = CLAIM_LEASE_S,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._owner = owner
        self.claim_lease_s = claim_lease_s
        self._claim = client.register_script(_CLAIM_SCRIPT)

    @property
    def owner(self) -> str:
        if self._owner is not None:
            return self._owner
        return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def for_owner(self, owner: str) -> JobRecords:
        """The same store, claiming under another owner's name."""
        return JobRecords(
            self.redis, ttl_s=self.ttl_s, owner=owner, claim_lease_s=self.claim_lease_s
        )

    def key(self, job_id: str) -> str:
        return f"{KEY_PREFIX}{job_id}"

    def claim(self, job_id: str) -> Claim:
        """Take the job id for this owner: `claimed` (go on and dispatch it), `dispatched`
        (sent or answered before), or `held` (another owner's claim is still within its lease).
        """
        outcome = self._claim(
            keys=[self.key(job_id)], args=[self.owner, self.claim_lease_s, self.ttl_s]
        )
        return outcome.decode()

    def claim_owner(self, job_id: str) -> str | None:
        owner = self.redis.hget(self.key(job_id), "claim_owner")
        return None if owner is None else owner.decode()

    def mark_dispatched(self, job_id: str) -> None:
        self.write(job_id, dispatched_at=repr(time.time()))

    def is_dispatched(self, job_id: str) -> bool:
        return bool(self.redis.hexists(self.key(job_id), "dispatched_at"))

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(self.key(job_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(job_id=job_id, fields=fields)

    def write(self, job_id: str, **fields: str) -> None:
        """Set text fields as they are."""
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(job_id), mapping=fields)
            pipe.expire(self.key(job_id), self.ttl_s)
            pipe.execute()

    def update(self, job_id: str, **values: Any) -> None:
        """Set fields to JSON-encoded values, read back with `JobRecord.value`."""
        self.write(job_id, **{name: json.dumps(value) for name, value in values.items()})

    def create(self, job: Job, *, payload: str) -> None:
        self.write(
            job.id,
            payload=payload,
            job=job.model_dump_json(),
            job_type=job.type.value,
            status="queued",
            stage="",
        )

    def stage_started(self, job_id: str, stage: str) -> int:
        """Note a stage's start; returns how many times it has started (deliveries)."""
        now = repr(time.time())
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.key(job_id), f"attempts:{stage}", 1)
            pipe.hset(self.key(job_id), mapping={"stage": stage, f"started:{stage}": now})
            pipe.hsetnx(self.key(job_id), f"first_started:{stage}", now)
            pipe.expire(self.key(job_id), self.ttl_s)
            attempts, *_ = pipe.execute()
        return int(attempts)

    def stage_finished(self, job_id: str, stage: str) -> None:
        self.write(job_id, **{f"finished:{stage}": repr(time.time())})

    def fail(self, job_id: str, *, stage: str, error: BaseException) -> None:
        """Leave the record saying which stage failed, and why."""
        self.write(job_id, status="failed", **_error_fields("error", stage, error))

    def delivery_failed(self, job_id: str, *, stage: str, error: BaseException) -> None:
        """The platform was never told the outcome: say so, keeping the job's own error."""
        self.write(
            job_id, status="delivery_failed", **_error_fields("delivery_error", stage, error)
        )


def _error_fields(name: str, stage: str, error: BaseException) -> dict[str, str]:
    """`name` (the text), `name_stage` and `name_type` of one error."""
    return {
        name: str(error) or type(error).__name__,
        f"{name}_stage": stage,
        f"{name}_type": type(error).__name__,
    }


@lru_cache(maxsize=1)
def get_records() -> JobRecords:
    """The process's record store on `REDIS_URL` (redis-py reconnects safely after a fork)."""
    settings = get_settings()
    return JobRecords(redis.Redis.from_url(settings.redis_url), ttl_s=settings.job_record_ttl_s)
