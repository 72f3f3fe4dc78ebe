"""Fencing: a run of a stage that no longer owns its job writes nothing and reports nothing.

A host cut off from Redis past LOST_JOB_TIMEOUT_S comes back to find its job sent again (a
new run: the record's `retries` + 1) or its stage's lease taken over; until it notices, its
stage goes on. So every record write of a stage run is conditional, in one Redis step:

- the record's `retries` must still be the run of the task's message (a message of no
  chain run, e.g. one applied by hand, is fenced by its lease alone);
- while the stage holds its lease, no other process may hold it. A lease released on
  purpose (its worker hands the job back at shutdown, and its message goes back to the
  queue) stops nothing: dropping that message would lose the job.

A write refused raises `RunSuperseded`: the stage stops there (its base task drops the
message, so its chain goes no further), and its failure handler writes nothing and sends no
callback. The lease's heartbeat also marks the fence lost as soon as Redis says the lease
is gone, and the generation's step hook stops the denoising loop on that mark.

The fence of the run in progress is a context variable, set by the stage's base task
(tasks/base.py) around the stage and around its failure handler: every write in between
(the stage's own, its progress reports, the record helpers it calls) is fenced without
passing the fence along. Writes outside a stage run (the bridge, the API, the sweeps) are
not fenced; they check what they need in their own atomic steps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import redis

from worker.errors import RunSuperseded


@dataclass(frozen=True)
class Fence:
    """Which run of which stage of a job may write its record."""

    job_id: str
    stage: str
    #: The run of the task's message (`run_of_task`); None: fenced by the lease alone.
    run: int | None
    #: The stage's lease owner while the run holds it; None once released (the failure
    #: handler: fenced by the run alone).
    owner: str | None
    #: Set once Redis answered that the fence no longer holds: the stage stops at its next
    #: check.
    lost: threading.Event = field(default_factory=threading.Event, compare=False)

    def refused(self) -> RunSuperseded:
        run = "" if self.run is None else f" (run {self.run})"
        return RunSuperseded(
            f"job {self.job_id} stage {self.stage}{run} no longer owns the job: it was sent "
            "again, or its lease was taken over; this run stops and writes nothing"
        )


#: Atomically: write fields only while the fence holds. KEYS: the record; ARGV: run ('' for
#: none), stage, lease owner ('' for none), record TTL, then field and value pairs (none:
#: only check). 1 if the fence holds (and the fields were written), 0 if not.
_FENCED_WRITE_SCRIPT = """
local run = tonumber(redis.call('HGET', KEYS[1], 'retries') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= run then return 0 end
local holder = redis.call('HGET', KEYS[1], 'lease:' .. ARGV[2])
if ARGV[3] ~= '' and holder and holder ~= ARGV[3] then return 0 end
if #ARGV > 4 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return 1
"""

_current: ContextVar[Fence | None] = ContextVar("wan_fence", default=None)


def active(job_id: str) -> Fence | None:
    """The fence of the stage run in progress here, if it is one of this job's."""
    fence = _current.get()
    return fence if fence is not None and fence.job_id == job_id else None


@contextmanager
def fenced(fence: Fence) -> Iterator[Fence]:
    """Fence every record write of `fence.job_id` made in this block (this thread)."""
    token = _current.set(fence)
    try:
        yield fence
    finally:
        _current.reset(token)


def raise_if_lost() -> None:
    """The check between denoising steps: no Redis call, only the heartbeat's mark."""
    fence = _current.get()
    if fence is not None and fence.lost.is_set():
        raise fence.refused()


def write(
    client: redis.Redis, key: str, fence: Fence, fields: dict[str, str], *, ttl_s: int
) -> None:
    """Write `fields` (none: only check) if the fence holds; RunSuperseded if not."""
    if not _apply(client, key, fence, fields, ttl_s=ttl_s):
        raise fence.refused()


def holds(client: redis.Redis, key: str, fence: Fence) -> bool:
    """Whether the fence still holds (nothing written)."""
    return _apply(client, key, fence, {}, ttl_s=0)


def _apply(
    client: redis.Redis, key: str, fence: Fence, fields: dict[str, str], *, ttl_s: int
) -> bool:
    pairs = [item for pair in fields.items() for item in pair]
    held = client.register_script(_FENCED_WRITE_SCRIPT)(
        keys=[key],
        args=["" if fence.run is None else fence.run, fence.stage, fence.owner or "", ttl_s,
              *pairs],
    )  # fmt: skip
    return bool(held)
