"""Priority lanes and fair share: in which order the generation workers take waiting jobs.

Celery's own message priorities on kombu's Redis transport do the ordering: each priority
step of a queue is a Redis list (`gpu`, `gpu<sep>1`, ... `gpu<sep>9`), and a worker's next
take (one message at a time: acks_late, prefetch 1) pops the first non-empty one, step 0
first. So only the generate message carries a priority, chosen when the job is sent:

- step 0 is kept for promoted jobs (waiting longer than PROMOTE_AFTER_S);
- PRIORITY_LANES: images take steps 1-4, videos 5-9; off, both take 1-9;
- FAIR_SHARE: a user's n-th waiting job of a lane sits n steps below the lane's first
  (capped at its last step), so it waits behind every other user's first, and never above
  that user's previous waiting job, so one user's jobs keep their order (one list is FIFO).

A job waits from its send until its generation begins (or it fails or is cancelled before):
two sorted sets per lane hold it, `wan:waiting:<lane>` (job id -> when sent: the depth and
oldest age /metrics exports) and `wan:waiting:<lane>:user:<user id>` (job id -> its step).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis

from worker.clock import redis_now, redis_stamp
from worker.jobs.model import Job
from worker.jobs.records import FINAL_STATUSES, JobRecords
from worker.settings import Settings

log = logging.getLogger(__name__)

#: kombu's priority steps on Redis (0 is taken first); celeryconfig passes them on.
PRIORITY_STEPS = tuple(range(10))
#: kombu's separator between a queue's name and its step (its default, kept: it also
#: separates the fields of kombu's binding sets, which a deployed Redis already holds).
PRIORITY_SEP = "\x06\x16"
#: Where a job waiting longer than PROMOTE_AFTER_S goes: ahead of every lane.
TOP_STEP = 0
#: The queue whose takes the lanes order, and the task whose message carries the step.
GPU_QUEUE = "gpu"
GENERATE_TASK = "wan.generate"
LANES = ("image", "video")
#: Where users take turns with PRIORITY_LANES off: one lane for every job.
ONE_LANE = "all"
KEY_PREFIX = "wan:waiting:"


def priority_lists(queue: str) -> list[str]:
    """The Redis lists holding one Celery queue's messages, highest priority first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting on a Celery queue, over all its priority lists."""
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())


def lane_steps(settings: Settings, lane: str) -> tuple[int, int]:
    """The first and last priority step of a lane."""
    if not settings.priority_lanes:
        return 1, PRIORITY_STEPS[-1]
    return (1, 4) if lane == "image" else (5, PRIORITY_STEPS[-1])


#: Atomically: the step of a job entering its lane (the one it has if it waits already).
#: KEYS: the lane's set, the user's set in the lane; ARGV: job id, now, the lane's first and
#: last step, fair share ('1' or '0'), the sets' TTL.
_ENTER_SCRIPT = """
local known = redis.call('ZSCORE', KEYS[2], ARGV[1])
if known then return tonumber(known) end
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
local step = first
if ARGV[5] == '1' then
  step = math.min(first + redis.call('ZCARD', KEYS[2]), last)
  local previous = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]
  if previous then step = math.min(math.max(step, tonumber(previous)), last) end
end
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], step, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return step
"""

#: Atomically: move one exact message to the top list if it is still waiting where it was
#: seen (another sweeper, or a worker's take, may have got it first). KEYS: its list, the
#: top list; ARGV: the raw message. LPUSH: behind the jobs promoted before, as kombu sends.
_PROMOTE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class LaneState:
    """What an autoscaler reads per lane: jobs waiting for generation, and the oldest wait."""

    waiting: int
    oldest_wait_s: float


class WaitingJobs:
    """The jobs sent and not yet generating, per lane and user; their priority steps."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._enter = client.register_script(_ENTER_SCRIPT)
        self._promote = client.register_script(_PROMOTE_SCRIPT)

    def enter(self, job: Job) -> int:
        """Note the job waiting in its lane; the priority step its generate message gets."""
        lane = job.content_type
        first, last = lane_steps(self.settings, lane)
        shared = lane if self.settings.priority_lanes else ONE_LANE  # where users take turns
        step = self._enter(
            keys=[_lane_key(lane), _user_key(shared, job.user_id)],
            args=[job.id, redis_stamp(self.redis), first, last, int(self.settings.fair_share),
                  self.settings.job_record_ttl_s],
        )  # fmt: skip
        return int(step)

    def leave(self, job: Job) -> None:
        """The job's generation began, or it ended before: it waits no more."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(_lane_key(job.content_type), job.id)
            for shared in (*LANES, ONE_LANE):  # whichever PRIORITY_LANES was when it entered
                pipe.zrem(_user_key(shared, job.user_id), job.id)
            pipe.execute()

    def state(self) -> dict[str, LaneState]:
        now = redis_now(self.redis)
        with self.redis.pipeline(transaction=False) as pipe:
            for lane in LANES:
                pipe.zcard(_lane_key(lane))
                pipe.zrange(_lane_key(lane), 0, 0, withscores=True)
            answers = pipe.execute()
        states = {}
        for lane, waiting, oldest in zip(LANES, answers[::2], answers[1::2], strict=True):
            age_s = max(0.0, now - oldest[0][1]) if oldest else 0.0
            states[lane] = LaneState(int(waiting), age_s)
        return states

    def waiting(self, lane: str, *, limit: int) -> list[tuple[str, float]]:
        """The lane's `limit` longest-waiting job ids, with seconds waited, oldest first."""
        now = redis_now(self.redis)
        entries = self.redis.zrange(_lane_key(lane), 0, limit - 1, withscores=True)
        return [(member.decode(), max(0.0, now - at)) for member, at in entries]

    def overdue(self, older_than_s: float) -> list[str]:
        """Waiting job ids sent more than `older_than_s` ago, oldest first, all lanes."""
        cutoff = redis_now(self.redis) - older_than_s
        with self.redis.pipeline(transaction=False) as pipe:
            for lane in LANES:
                pipe.zrangebyscore(_lane_key(lane), "-inf", cutoff, withscores=True)
            found = [entry for entries in pipe.execute() for entry in entries]
        return [member.decode() for member, _ in sorted(found, key=lambda entry: entry[1])]

    def promote(self, job_ids: list[str]) -> list[str]:
        """Move the generate messages of these jobs (oldest first) to the top step; the ids
        moved. A job not on the lower lists (still enhancing, taken, promoted) is skipped."""
        if not job_ids:
            return []
        lists = priority_lists(GPU_QUEUE)
        top, lower = lists[TOP_STEP], lists[TOP_STEP + 1 :]
        with self.redis.pipeline(transaction=False) as pipe:
            for name in lower:
                pipe.lrange(name, 0, -1)
            contents = pipe.execute()
        where = {}  # job id -> (its list, its raw message)
        for name, raws in zip(lower, contents, strict=True):
            for raw in raws:
                job_id = _generate_job_id(raw)
                if job_id is not None:
                    where.setdefault(job_id, (name, raw))
        promoted = []
        for job_id in job_ids:
            if job_id in where and self._promote(keys=[where[job_id][0], top],
                                                 args=[where[job_id][1]]):  # fmt: skip
                promoted.append(job_id)
        return promoted

    def prune(self, records: JobRecords) -> int:
        """Drop entries a crash left behind: jobs whose record is gone, final, or whose
        generation began (a worker killed between the two writes). How many. Reads the
        three fields that tell, of the waiting jobs only, in one round trip per lane."""
        stale = 0
        for lane in LANES:
            job_ids = [m.decode() for m in self.redis.zrange(_lane_key(lane), 0, -1)]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hmget(records.key(job_id), "job", "status", "started:generate")
                found = pipe.execute()
            for job_id, (job, status, started) in zip(job_ids, found, strict=True):
                if job is None or (status or b"").decode() in FINAL_STATUSES or started:
                    self.redis.zrem(_lane_key(lane), job_id)
                    if job is not None:
                        self.leave(Job.model_validate_json(job))
                    stale += 1
        return stale


def leave_waiting(records: JobRecords, settings: Settings, job_id: str) -> None:
    """`WaitingJobs.leave` for a job known by id (a record without a job never waited)."""
    record = records.get(job_id)
    if "job" in record.fields:
        WaitingJobs(records.redis, settings).leave(record.job)


def promote_overdue(records: JobRecords, settings: Settings) -> list[str]:
    """One sweep: jobs waiting longer than PROMOTE_AFTER_S go to the top step; leftovers of
    crashes are pruned. Several sweepers at once promote each message once."""
    waiting = WaitingJobs(records.redis, settings)
    waiting.prune(records)
    promoted = waiting.promote(waiting.overdue(settings.promote_after_s))
    for job_id in promoted:
        log.info(
            "job=%s waited longer than PROMOTE_AFTER_S=%g: promoted ahead of every lane",
            job_id,
            settings.promote_after_s,
        )
    return promoted


def _generate_job_id(raw: bytes) -> str | None:
    """The job id of a generate task message, None for any other message."""
    try:
        headers = json.loads(raw)["headers"]
    except (ValueError, KeyError, TypeError):
        return None
    if headers.get("task") != GENERATE_TASK:
        return None
    return str(headers["id"]).split(":")[0]


def _lane_key(lane: str) -> str:
    return f"{KEY_PREFIX}{lane}"


def _user_key(lane: str, user_id: str) -> str:
    return f"{KEY_PREFIX}{lane}:user:{user_id}"
