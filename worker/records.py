"""Job records: one Redis hash per job, written by the bridge and updated by every stage.

Stages pass only the job id; whatever they need (the job, the seed used, file paths)
is read back from here, so any stage can run again after a crash.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis

from worker.jobs import Job
from worker.settings import get_settings

KEY_PREFIX = "wan:job:"
#: Statuses after which the platform expects no more callbacks for a job.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


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
    """Reads and writes job records; every write renews the record's expiry."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def key(self, job_id: str) -> str:
        return f"{KEY_PREFIX}{job_id}"

    def claim(self, job_id: str) -> bool:
        """First caller wins: False when the job id has been seen before."""
        claimed = self.redis.hsetnx(self.key(job_id), "claimed_at", repr(time.time()))
        self.redis.expire(self.key(job_id), self.ttl_s)
        return bool(claimed)

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
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.key(job_id), f"attempts:{stage}", 1)
            pipe.hset(
                self.key(job_id), mapping={"stage": stage, f"started:{stage}": repr(time.time())}
            )
            pipe.expire(self.key(job_id), self.ttl_s)
            attempts, *_ = pipe.execute()
        return int(attempts)

    def stage_finished(self, job_id: str, stage: str) -> None:
        self.write(job_id, **{f"finished:{stage}": repr(time.time())})

    def fail(self, job_id: str, *, stage: str, error: BaseException) -> None:
        """Leave the record saying which stage failed, and why."""
        self.write(
            job_id,
            status="failed",
            error_stage=stage,
            error=str(error) or type(error).__name__,
            error_type=type(error).__name__,
        )


@lru_cache(maxsize=1)
def get_records() -> JobRecords:
    """The process's record store on `REDIS_URL` (redis-py reconnects safely after a fork)."""
    settings = get_settings()
    return JobRecords(redis.Redis.from_url(settings.redis_url), ttl_s=settings.job_record_ttl_s)
