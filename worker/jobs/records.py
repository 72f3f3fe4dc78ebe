"""Job records: one Redis hash per job, written by the bridge and updated by every stage.

Stages pass only the job id; whatever they need (the job, the seed used, file paths)
is read back from here, so any stage can run again after a crash.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker import connections
from worker.clock import redis_now, redis_stamp
from worker.jobs import fencing
from worker.jobs.model import Job
from worker.settings import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "wan:job:"
#: Every job id with a record, scored by when it was first claimed: `jobs list` reads it
#: newest first and pages through it, instead of scanning every key of the broker's Redis.
INDEX_KEY = "wan:jobs"
#: The jobs the platform has not yet been told the end of (running, waiting for a stage, or
#: owing their final callback), scored by when each was sent (Redis time): what the sweeps
#: read, so a pass costs these jobs, never every record. A job enters in the step that
#: writes its record to be sent (`write_active`) and leaves in the step that notes its final
#: callback accepted or given up (`callback_sent`, `delivery_failed`).
ACTIVE_KEY = "wan:jobs:active"
#: The chain's stages in order, as records name them.
STAGES = ("enhance", "generate", "encode", "thumbnail", "upload", "callback")
#: Statuses after which the platform expects no more callbacks for a job.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: How long a claim on a job id keeps others off it, seconds. Claim to dispatch takes
#: milliseconds; a claim older than this belongs to a dispatcher that died, and is taken over.
CLAIM_LEASE_S = 300

Claim = Literal["claimed", "dispatched", "held"]
#: What a stage's start finds; see `JobRecords.begin_stage`.
StageStart = Literal["run", "done", "busy", "too_many", "superseded"]
#: How often an acknowledged write lost in a Redis failover is written again before the
#: writer gives up (`JobRecords.replicated`): once per failover met.
REWRITES = 3
#: What `JobRecords.resend_lost` did: `resent` (the caller sends the chain), `too_many` (the
#: job is failed: the caller reports it) or `gone` (another sweeper, or the job, moved on).
Resend = Literal["resent", "too_many", "gone"]
#: What a record write does to the job's place in the index of active jobs.
IndexChange = Literal["keep", "enter", "leave"]
#: Media workers' heartbeats: WORKER_HOST -> Redis time of its media worker's last sweep.
MEDIA_HOSTS_KEY = "wan:media_hosts"
#: Where a job's frames live: these stages read the spool of the host that generated them.
SPOOL_STAGES = ("encode", "thumbnail", "upload")

#: Atomically: a dispatched job stays dispatched; a claim of another owner whose lease runs
#: is left alone; otherwise the caller holds the claim for the lease from Redis's own clock
#: (one clock for every host), and the job id enters the index. KEYS: the record, the index;
#: ARGV: owner, lease seconds, record TTL, job id.
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
redis.call('ZADD', KEYS[2], 'NX', now, ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'claimed'
"""


#: Atomically, on Redis's clock: decide what a stage's start does (`JobRecords.begin_stage`).
#: KEYS: the record; ARGV: stage, owner, lease seconds, record TTL, MAX_DELIVERIES, the
#: lease owner known dead ('' if none), this process's pid namespace, its WORKER_HOST, the
#: run of the delivered message ('' if not a chain's). Returns {outcome, deliveries,
#: seconds left of a live lease}.
_BEGIN_STAGE_SCRIPT = """
local stage = ARGV[1]
local run = tonumber(redis.call('HGET', KEYS[1], 'retries') or '0')
if ARGV[9] ~= '' and tonumber(ARGV[9]) < run then return {'superseded', '0', '0'} end
if redis.call('HEXISTS', KEYS[1], 'finished:' .. stage) == 1 then return {'done', '0', '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local owner = redis.call('HGET', KEYS[1], 'lease:' .. stage)
local deliveries = tonumber(redis.call('HGET', KEYS[1], 'deliveries:' .. stage) or '0')
if owner and owner ~= ARGV[2] then
  local expires = tonumber(redis.call('HGET', KEYS[1], 'lease_until:' .. stage) or '0')
  if owner ~= ARGV[6] and now < expires then
    return {'busy', tostring(deliveries), string.format('%.3f', expires - now)}
  end
  deliveries = deliveries + 1
end
deliveries = math.max(deliveries, 1)
redis.call('HSET', KEYS[1], 'deliveries:' .. stage, deliveries)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if deliveries > tonumber(ARGV[5]) then
  redis.call('HDEL', KEYS[1], 'lease:' .. stage, 'lease_until:' .. stage, 'lease_pidns:' .. stage)
  return {'too_many', tostring(deliveries), '0'}
end
local at = string.format('%.6f', now)
redis.call('HSET', KEYS[1], 'lease:' .. stage, ARGV[2],
           'lease_until:' .. stage, string.format('%.6f', now + tonumber(ARGV[3])),
           'lease_pidns:' .. stage, ARGV[7], 'stage', stage, 'started:' .. stage, at,
           'host:' .. stage, ARGV[8])
redis.call('HINCRBY', KEYS[1], 'attempts:' .. stage, 1)
redis.call('HSETNX', KEYS[1], 'first_started:' .. stage, at)
return {'run', tostring(deliveries), '0'}
"""

#: Atomically: extend the lease if the owner still holds it. KEYS: the record; ARGV: stage,
#: owner, lease seconds. 1 if renewed, 0 if the lease is gone (taken over).
_RENEW_STAGE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'lease:' .. ARGV[1]) ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until:' .. ARGV[1], string.format('%.6f', until_))
return 1
"""

#: Atomically: drop the lease if the owner still holds it, and note why in `<note>:<stage>`
#: when a note is given. KEYS: the record; ARGV: stage, owner, note ('' for none).
_RELEASE_STAGE_SCRIPT = """
local stage = ARGV[1]
if redis.call('HGET', KEYS[1], 'lease:' .. stage) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'lease:' .. stage, 'lease_until:' .. stage, 'lease_pidns:' .. stage)
if ARGV[3] ~= '' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], ARGV[3] .. ':' .. stage,
             string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6))
end
return 1
"""


#: Atomically: send a lost job again from a stage, unless another sweeper or the job itself
#: moved on since the caller read the record (status, run and the lost stage's lease owner
#: as read). Counts a delivery of the restart stage; past MAX_DELIVERIES the job is failed
#: instead. KEYS: the record; ARGV: lost stage, its lease owner as read ('' for none), run
#: as read, restart stage, MAX_DELIVERIES, record TTL, then the fields a new run forgets.
#: `resend_pending` stays until the sweeper has sent the chain (`JobRecords.resend_sent`).
#: Returns {outcome, deliveries}.
_RESEND_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'processing' then return {'gone', '0'} end
if (redis.call('HGET', KEYS[1], 'retries') or '0') ~= ARGV[3] then return {'gone', '0'} end
if (redis.call('HGET', KEYS[1], 'lease:' .. ARGV[1]) or '') ~= ARGV[2] then return {'gone', '0'} end
local deliveries = tonumber(redis.call('HGET', KEYS[1], 'deliveries:' .. ARGV[4]) or '1') + 1
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('EXPIRE', KEYS[1], ARGV[6])
if deliveries > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'deliveries:' .. ARGV[4], deliveries,
             'callback_pending', 'failed', 'callback_pending_at', now)
  return {'too_many', tostring(deliveries)}
end
for i = 7, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[1], 'status', 'processing', 'stage', '', 'retries', tonumber(ARGV[3]) + 1,
           'retried_from', ARGV[4], 'deliveries:' .. ARGV[4], deliveries, 'lost:' .. ARGV[1], now,
           'resend_pending', now)
return {'resent', tostring(deliveries)}
"""


#: Atomically, for each job: drop it from the index of active jobs if its record is gone or
#: settled (`settled`) still, as the caller read it: an operator's retry in between brings
#: it back and keeps it. KEYS: the index, then the records; ARGV: the job ids.
_DROP_SETTLED_SCRIPT = """
local dropped = 0
for i = 2, #KEYS do
  local done = redis.call('EXISTS', KEYS[i]) == 0
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == 'delivery_failed' then done = true end
  if status == 'completed' or status == 'failed' or status == 'cancelled' then
    done = redis.call('HEXISTS', KEYS[i], 'callback_sent:' .. status) == 1
  end
  if done then dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i - 1]) end
end
return dropped
"""


class WriteLost(redis.ConnectionError):
    """A write the platform relies on was lost in a Redis failover (the master died before
    a replica had it): an outage to the caller, which does its step again."""


def stage_task_id(job_id: str, stage: str, run: int = 0) -> str:
    """`{job_id}:{stage}`; each later run of the chain (an operator's retry, the lost-job
    sweep's resend) gets fresh ids, `{job_id}:{stage}:retry{n}`."""
    return f"{job_id}:{stage}" if run == 0 else f"{job_id}:{stage}:retry{run}"


def final_callback_task_id(job_id: str, status: str, run: int = 0) -> str:
    """`{job_id}:callback:{status}`, with `:retry{n}` from the job's run 1 on: a final
    callback belongs to the run whose end it reports, and a later run supersedes it."""
    base = f"{job_id}:callback:{status}"
    return base if run == 0 else f"{base}:retry{run}"


def run_of_task(task_id: str, job_id: str, stage: str) -> int | None:
    """The run a stage's task id belongs to (`stage_task_id` and `final_callback_task_id`
    read back); None for any other id (a task applied by hand)."""
    base = f"{job_id}:{stage}"
    if stage == "callback":
        for status in FINAL_STATUSES:
            if task_id.startswith(f"{base}:{status}"):
                base = f"{base}:{status}"
                break
    if task_id == base:
        return 0
    run = task_id.removeprefix(f"{base}:retry")
    return int(run) if run != task_id and run.isdigit() else None


def lease_owner(pid: int | None = None) -> str:
    """`hostname:pid` of the process running a stage (this one by default)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _pid_namespace() -> str:
    """Which pids this process sees: containers sharing a hostname (compose gives the gpu
    and cpu containers one) do not see each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_gone(pid: int) -> bool:
    """No such process here, or only its zombie (whose parent died before reaping it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


@dataclass(frozen=True)
class StageRun:
    """What `JobRecords.begin_stage` decided, with the stage's deliveries so far."""

    outcome: StageStart
    deliveries: int
    #: Seconds the live lease of another owner still runs (`busy` only).
    lease_left_s: float


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

    def host(self, stage: str) -> str | None:
        """The WORKER_HOST that runs or ran the stage's latest delivery."""
        return self.fields.get(f"host:{stage}")

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
        replica_wait: connections.ReplicaWait | None = None,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._owner = owner
        self.claim_lease_s = claim_lease_s
        #: Under Sentinel, the writes the platform relies on wait for a replica.
        self.replica_wait = replica_wait
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._begin_stage = client.register_script(_BEGIN_STAGE_SCRIPT)
        self._renew_stage = client.register_script(_RENEW_STAGE_SCRIPT)
        self._release_stage = client.register_script(_RELEASE_STAGE_SCRIPT)
        self._resend = client.register_script(_RESEND_SCRIPT)
        self._drop_settled = client.register_script(_DROP_SETTLED_SCRIPT)

    @property
    def owner(self) -> str:
        if self._owner is not None:
            return self._owner
        return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def for_owner(self, owner: str) -> JobRecords:
        """The same store, claiming under another owner's name."""
        return JobRecords(
            self.redis,
            ttl_s=self.ttl_s,
            owner=owner,
            claim_lease_s=self.claim_lease_s,
            replica_wait=self.replica_wait,
        )

    def key(self, job_id: str) -> str:
        return f"{KEY_PREFIX}{job_id}"

    def claim(self, job_id: str) -> Claim:
        """Take the job id for this owner: `claimed` (go on and dispatch it), `dispatched`
        (sent or answered before), or `held` (another owner's claim is still within its lease).
        """
        outcome = self._claim(
            keys=[self.key(job_id), INDEX_KEY],
            args=[self.owner, self.claim_lease_s, self.ttl_s, job_id],
        )
        return outcome.decode()

    def claim_owner(self, job_id: str) -> str | None:
        owner = self.redis.hget(self.key(job_id), "claim_owner")
        return None if owner is None else owner.decode()

    def mark_dispatched(self, job_id: str) -> None:
        """Close the claim, once a replica has the job's record and chain (`replicated`):
        the bridge takes the item off the platform's list only after this. Lost in a
        failover, the mark is not written again: the record and the chain sent before it may
        be lost too, so it raises WriteLost and the caller dispatches the job again."""
        fields = {"dispatched_at": redis_stamp(self.redis)}
        self.write(job_id, **fields)
        self.replicated(job_id, fields, rewrite=False)

    def replicated(self, job_id: str, fields: dict[str, str], *, rewrite: bool = True) -> None:
        """Under Sentinel, wait until a replica has `fields` as just written, and every write
        before them: what the platform was told survives a failover (worker/connections.py
        `ReplicaWait`). Fields that a failover in between lost are written again on the new
        master (`rewrite`: facts that stand alone, a finished stage or a delivered callback)
        or raise WriteLost. Nothing without Sentinel."""
        if self.replica_wait is None:
            return
        for _ in range(REWRITES):
            if self.replica_wait.confirm(self.redis, self.key(job_id), fields, ttl_s=self.ttl_s):
                return
            if not rewrite:
                raise WriteLost(f"job {job_id}: {', '.join(fields)} lost in a Redis failover")
            log.warning("job=%s %s lost in a Redis failover: written again", job_id,
                        ", ".join(fields))  # fmt: skip
            self.write(job_id, **fields)
        raise WriteLost(f"job {job_id}: {', '.join(fields)} lost in Redis failovers")

    def is_dispatched(self, job_id: str) -> bool:
        return bool(self.redis.hexists(self.key(job_id), "dispatched_at"))

    def get(self, job_id: str) -> JobRecord:
        return _record(job_id, self.redis.hgetall(self.key(job_id)))

    def newest(self, *, page: int = 200) -> Iterator[JobRecord]:
        """Every record, newest claim first, read a page at a time from the index (a job
        claimed while this runs may shift a page and show up twice or not at all)."""
        self.prune_index()
        for start in itertools.count(0, page):
            job_ids = [m.decode() for m in self.redis.zrevrange(INDEX_KEY, start, start + page - 1)]
            if not job_ids:
                return
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(self.key(job_id))
                raws = pipe.execute()
            yield from (
                _record(job_id, raw) for job_id, raw in zip(job_ids, raws, strict=True) if raw
            )

    def prune_index(self) -> int:
        """Drop index entries whose record expired; only claims older than the record TTL
        can be gone (every write renews a record). How many were dropped."""
        old = self.redis.zrangebyscore(INDEX_KEY, "-inf", self.now() - self.ttl_s)
        if not old:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for member in old:
                pipe.exists(self.key(member.decode()))
            alive = pipe.execute()
        gone = [member for member, exists in zip(old, alive, strict=True) if not exists]
        return int(self.redis.zrem(INDEX_KEY, *gone)) if gone else 0

    def write(self, job_id: str, **fields: str) -> None:
        """Set text fields as they are; inside a stage run, only while that run still owns
        the job (worker/jobs/fencing.py: RunSuperseded if not)."""
        self._write(job_id, fields)

    def confirm_run(self, job_id: str) -> None:
        """Before an effect outside the record (a file, an upload, a callback): raise
        RunSuperseded unless the stage run in progress here still owns the job."""
        if (fence := fencing.active(job_id)) is not None:
            fencing.write(self.redis, self.key(job_id), fence, {}, ttl_s=self.ttl_s)

    def update(self, job_id: str, **values: Any) -> None:
        """Set fields to JSON-encoded values, read back with `JobRecord.value`."""
        self.write(job_id, **{name: json.dumps(value) for name, value in values.items()})

    def write_active(self, job_id: str, **fields: str) -> None:
        """`write`, and the job enters the index of active jobs (`ACTIVE_KEY`) in the same
        step: it is about to be sent, or owes the platform a callback again."""
        self._write(job_id, fields, index="enter")

    def _write_settled(self, job_id: str, **fields: str) -> None:
        """`write`, and the job leaves the index of active jobs in the same step."""
        self._write(job_id, fields, index="leave")

    def _write(self, job_id: str, fields: dict[str, str], *, index: IndexChange = "keep") -> None:
        """Set `fields` (fenced inside a stage run) and change the job's place in the index
        of active jobs. Fenced, the index follows the fenced write: a crash in between
        leaves a settled job indexed, which `active()` drops when it meets it."""
        now = self.now() if index == "enter" else 0.0
        if (fence := fencing.active(job_id)) is not None:
            fencing.write(self.redis, self.key(job_id), fence, fields, ttl_s=self.ttl_s)
            _change_index(self.redis, job_id, index, now)
            return
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key(job_id), mapping=fields)
            pipe.expire(self.key(job_id), self.ttl_s)
            _change_index(pipe, job_id, index, now)
            pipe.execute()

    def active(self, *, page: int = 500) -> Iterator[tuple[JobRecord, float]]:
        """Every active job's record with when it was sent (Redis time), read a page at a
        time; entries whose record expired, or that settled by a step that left them, are
        dropped from the index as they are met. Costs the active jobs, whatever the number
        of records."""
        entries = self.redis.zrange(ACTIVE_KEY, 0, -1, withscores=True)
        for start in range(0, len(entries), page):
            chunk = [(member.decode(), at) for member, at in entries[start : start + page]]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in chunk:
                    pipe.hgetall(self.key(job_id))
                raws = pipe.execute()
            gone = []
            for (job_id, at), raw in zip(chunk, raws, strict=True):
                record = _record(job_id, raw)
                if not raw or settled(record):
                    gone.append(job_id)
                else:
                    yield record, at
            if gone:
                self._drop_settled(keys=[ACTIVE_KEY, *map(self.key, gone)], args=gone)

    def expires_at(self, job_id: str) -> float | None:
        """When the record expires unless written again (Redis time); None if there is none."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.pttl(self.key(job_id))
            (seconds, micros), left_ms = pipe.execute()
        return None if left_ms < 0 else seconds + micros / 1e6 + left_ms / 1000

    def create(self, job: Job, *, payload: str) -> None:
        self.write_active(
            job.id,
            payload=payload,
            job=job.model_dump_json(),
            job_type=job.type.value,
            status="queued",
            stage="",
        )

    def begin_stage(
        self,
        job_id: str,
        stage: str,
        *,
        lease_s: float,
        max_deliveries: int,
        run: int | None = None,
    ) -> StageRun:
        """Decide whether this process runs the stage now, and if so take its lease.

        - `run`: no lease, or one whose owner died (expired, or a process gone from this
          host, e.g. a killed pool child); a dead owner's lease counts one more delivery.
          The lease is this process's until `release_stage` or `lease_s` without renewal;
          `host:<stage>` says which WORKER_HOST runs (ran) it.
        - `done`: the stage finished before; nothing is changed.
        - `busy`: another owner's live lease: a duplicate delivery, not counted.
        - `too_many`: this would be delivery MAX_DELIVERIES + 1.
        - `superseded`: the message is of an older `run` of the chain than the record's (the
          job was sent again since: its old message came back from a dead worker).

        A lease released on purpose (success, failure, retry, hand-back) counts nothing.
        """
        key = self.key(job_id)
        held, pidns = self.redis.hmget(key, f"lease:{stage}", f"lease_pidns:{stage}")
        dead = ""
        if held is not None and pidns is not None and pidns.decode() == _pid_namespace():
            host, _, pid = held.decode().rpartition(":")
            if host == socket.gethostname() and _process_gone(int(pid)):
                dead = held.decode()
        outcome, deliveries, left_s = self._begin_stage(
            keys=[key],
            args=[stage, lease_owner(), lease_s, self.ttl_s, max_deliveries, dead,
                  _pid_namespace(), get_settings().worker_host, "" if run is None else run],
        )  # fmt: skip
        return StageRun(outcome.decode(), int(deliveries), float(left_s))

    def renew_stage(self, job_id: str, stage: str, *, lease_s: float) -> bool:
        """Extend this process's lease; False if it lost it (taken over as dead)."""
        renewed = self._renew_stage(keys=[self.key(job_id)], args=[stage, lease_owner(), lease_s])
        return bool(renewed)

    def release_stage(
        self, job_id: str, stage: str, *, owner: str | None = None, note: str = ""
    ) -> bool:
        """Drop the lease `owner` (this process by default) holds, noting `note:<stage>`;
        False if it held none."""
        released = self._release_stage(
            keys=[self.key(job_id)], args=[stage, owner or lease_owner(), note]
        )
        return bool(released)

    def resend_lost(
        self,
        record: JobRecord,
        *,
        stage: str,
        restart: str,
        forget: list[str],
        max_deliveries: int,
    ) -> tuple[Resend, int]:
        """Start a new run of a lost job from `restart` in the record, if `record` (as read)
        is still how things stand: see `_RESEND_SCRIPT`. `forget`: the fields the new run
        starts without. The outcome and the restart stage's deliveries."""
        fields = record.fields
        outcome, deliveries = self._resend(
            keys=[self.key(record.job_id)],
            args=[stage, fields.get(f"lease:{stage}", ""), fields.get("retries", "0"), restart,
                  max_deliveries, self.ttl_s, *forget],
        )  # fmt: skip
        return outcome.decode(), int(deliveries)

    def resend_sent(self, job_id: str) -> None:
        """The chain of a resend is on its way: a sweeper that dies before this line (or
        whose send failed) leaves `resend_pending`, and a later sweep sends it again."""
        self.redis.hdel(self.key(job_id), "resend_pending")

    def now(self) -> float:
        """Redis's clock, seconds: the one leases and heartbeats are kept on, the same for
        every host whatever their own clocks say."""
        return redis_now(self.redis)

    def media_heartbeat(self, host: str) -> None:
        """Say that `host` has a live media worker, on Redis's clock."""
        self.redis.hset(MEDIA_HOSTS_KEY, host, redis_stamp(self.redis))

    def media_hosts(self) -> dict[str, float]:
        """When each host's media worker last said it lives (Redis time)."""
        return {k.decode(): float(v) for k, v in self.redis.hgetall(MEDIA_HOSTS_KEY).items()}

    def stage_finished(self, job_id: str, stage: str) -> None:
        """Note the stage done (later deliveries skip it) and release its lease. On Redis's
        clock, as `started:<stage>` is: a stage's seconds never mix two hosts' clocks."""
        fields = {f"finished:{stage}": redis_stamp(self.redis)}
        self.write(job_id, **fields)
        self.release_stage(job_id, stage)
        self.replicated(job_id, fields)

    def callback_sent(self, job_id: str, status: str) -> None:
        """Note when the platform accepted a callback of this status; a final one settles
        the job (it leaves the index of active jobs)."""
        fields = {f"callback_sent:{status}": redis_stamp(self.redis)}
        if status in FINAL_STATUSES:
            self._write_settled(job_id, **fields)
            self.replicated(job_id, fields)
        else:
            self.write(job_id, **fields)

    def fail(self, job_id: str, *, stage: str, error: BaseException) -> None:
        """Leave the record saying which stage failed, and why, with the `failed` callback
        due (`final_callback_due`)."""
        fields = {
            "status": "failed",
            **_error_fields("error", stage, error),
            **self.final_callback_due(job_id, "failed"),
        }
        self.write(job_id, **fields)
        self.replicated(job_id, fields)

    def final_callback_due(self, job_id: str, status: str) -> dict[str, str]:
        """A final status's callback written before it is sent (worker/flow/outbox.py): the fields
        returned, written with the final status, say which callback is due and since when
        (Redis time) until it is handed to the broker. The job is in the index of active jobs
        from here until it settles (already, unless it was recorded before the index was)."""
        now = self.now()
        self.redis.zadd(ACTIVE_KEY, {job_id: now}, nx=True)
        return {"callback_pending": status, "callback_pending_at": f"{now:.6f}"}

    def delivery_failed(self, job_id: str, *, stage: str, error: BaseException) -> None:
        """The platform was never told the outcome: say so, keeping the job's own error. The
        job settles (an operator's `jobs retry` sends the callback again)."""
        self._write_settled(
            job_id, status="delivery_failed", **_error_fields("delivery_error", stage, error)
        )


def _change_index(client: redis.Redis, job_id: str, change: IndexChange, now: float) -> None:
    """Enter the job in the index of active jobs at `now`, drop it from it, or neither."""
    if change == "enter":
        client.zadd(ACTIVE_KEY, {job_id: now})
    elif change == "leave":
        client.zrem(ACTIVE_KEY, job_id)


def settled(record: JobRecord) -> bool:
    """Whether nothing more is owed to the platform: its final callback was accepted or
    given up on (`delivery_failed`)."""
    status = record.status
    if status == "delivery_failed":
        return True
    return status in FINAL_STATUSES and f"callback_sent:{status}" in record.fields


def _record(job_id: str, raw: dict[bytes, bytes]) -> JobRecord:
    return JobRecord(job_id=job_id, fields={k.decode(): v.decode() for k, v in raw.items()})


def _error_fields(name: str, stage: str, error: BaseException) -> dict[str, str]:
    """`name` (the text), `name_stage` and `name_type` of one error."""
    return {
        name: str(error) or type(error).__name__,
        f"{name}_stage": stage,
        f"{name}_type": type(error).__name__,
    }


#: How a record write rides out a Redis restart: redis-py's own retry of a command on a
#: connection error or timeout, backing off from 0.1 s to 2 s, about 30 s in all. Without
#: it a stage that met a restart in its bookkeeping failed the job (or, with Redis still
#: away in on_failure, left it running for the lost-job sweep to find minutes later).
REDIS_OUTAGE_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20)


@lru_cache(maxsize=1)
def get_records() -> JobRecords:
    """The process's record store on `REDIS_URL` or its Sentinel set (redis-py reconnects
    safely after a fork); its commands wait out a short Redis outage or a failover
    (`REDIS_OUTAGE_RETRY`)."""
    settings = get_settings()
    client = connections.client(connections.records_target(settings), retry=REDIS_OUTAGE_RETRY)
    return JobRecords(
        client,
        ttl_s=settings.job_record_ttl_s,
        claim_lease_s=settings.claim_lease_s,
        replica_wait=connections.replica_wait(settings),
    )
