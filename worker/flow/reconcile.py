"""Swallowed messages: a job waiting for a stage whose message is nowhere runs again.

kombu's Redis transport takes a message off its queue with BRPOP and only then notes it
unacknowledged (the `unacked` hash and its `unacked_index`). A consumer that dies in
between, or whose BRPOP Redis serves just as its connection drops, takes the message with
it (Celery #4354, kombu #1836): no stage starts, so no lease runs out and the lost-job sweep
sees only a job waiting in a queue, and the visibility timeout never brings the message
back, as it was never noted. The job would wait for ever.

A job is swallowed when it has waited LOST_JOB_TIMEOUT_S for a stage to start (`queued`, or
a stage finished or let go of and the next not begun) and no message of its run is
- on a queue: every priority list (worker/flow/lanes.py `priority_lists`) of `enhance`, `gpu`,
  `cpu` and each host's `cpu.<host>`;
- or held by a worker: kombu's `unacked` hash, where every message a worker has taken sits
  until it is acknowledged, prefetched (Celery's reserved list), counting down a retry or
  running;
in one atomic read of them all (MULTI), on two passes of the same sweeper at least
CONFIRM_S apart: the moment between a live worker's BRPOP and its note in `unacked` lasts
milliseconds, a dead one's lasts for ever.

It is then sent again as a new run, exactly as a lost job is (`LostJobSweep.resend`): one
atomic claim on the record, counted as a delivery of the stage so MAX_DELIVERIES still holds;
the old message, should it ever come back, is skipped as superseded. A job that waits hours
behind a deep queue has its message on that queue and is never sent again.

A pass costs the index of active jobs (`JobRecords.active`, never every record) and, only
while one of them has waited half the timeout, one read of the queues and the unacked hash:
both bounded by the jobs waiting and held, not by the jobs ever run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from worker.flow.job_control import RUNNING_STATUSES
from worker.flow.lanes import GPU_QUEUE, priority_lists
from worker.flow.lost_jobs import LostJob, LostJobSweep, restart_stage
from worker.flow.sender import Sender
from worker.jobs.records import STAGES, JobRecord, JobRecords, run_of_task

#: kombu's hash of the messages workers hold: delivery tag -> [message, exchange, key].
UNACKED_KEY = "unacked"
#: The queues a stage's message waits on besides the hosts' own `cpu.<host>`.
SHARED_QUEUES = ("enhance", GPU_QUEUE, "cpu")
#: A message missing on two passes this far apart is gone, not in a live worker's hand
#: between its BRPOP and its note in `unacked` (a matter of milliseconds), seconds.
CONFIRM_S = 1.0
#: What the resend's log line says is silent (`LostJobSweep.resend`).
NOWHERE = "its message (on no queue, held by no worker)"
#: The run of a message that belongs to no run (a final callback's): counts as any run.
ANY_RUN = math.inf


@dataclass(frozen=True)
class Waiting:
    """A job waiting for a stage to start: which, and since when (Redis time)."""

    record: JobRecord
    stage: str
    since: float

    @property
    def run(self) -> int:
        return int(self.record.fields.get("retries", "0"))

    @property
    def frames_host(self) -> str | None:
        return (self.record.value("generation") or {}).get("host")


def waiting_stage(record: JobRecord) -> str | None:
    """The stage the job waits to start, None when a stage runs, the job is over, or a
    lost-job resend is still being sent (the lost-job sweep's to finish)."""
    fields = record.fields
    if record.status not in RUNNING_STATUSES or "resend_pending" in fields:
        return None
    stage = fields.get("stage", "")
    if stage == "":  # sent, nothing started: from the start, or from where it was sent again
        return fields.get("retried_from") or STAGES[0]
    if stage not in STAGES or f"lease:{stage}" in fields:
        return None
    if f"finished:{stage}" not in fields:
        return stage  # let go of without finishing: a Celery retry, or handed back
    later = STAGES[STAGES.index(stage) + 1 :]
    return later[0] if later else None


def waiting_since(record: JobRecord, sent_at: float) -> float:
    """When the job last moved (Redis time): sent (`sent_at`, its index entry), or a stage
    started, finished, handed back or lost, whichever came last."""
    marks = ("started:", "finished:", "handed_back:", "lost:")
    moves = [float(at) for name, at in record.fields.items() if name.startswith(marks)]
    return max([sent_at, *moves])


def newest_runs(messages: Iterable[dict]) -> dict[str, float]:
    """Job id -> the newest run of the job that one of these task messages belongs to."""
    runs: dict[str, float] = {}
    for message in messages:
        try:
            task_id = str(message["headers"]["id"])
        except (KeyError, TypeError):
            continue  # not a Celery task message
        job_id, _, rest = task_id.partition(":")
        run = run_of_task(task_id, job_id, rest.partition(":")[0])
        runs[job_id] = max(runs.get(job_id, -1), ANY_RUN if run is None else run)
    return runs


def held_messages(client: redis.Redis, queues: Iterable[str]) -> dict[str, float]:
    """`newest_runs` of every message on these queues (all their priority lists) or held by
    a worker, read in one atomic step: a message moving from a queue to a worker's `unacked`
    entry (or back, when kombu restores it) is seen in one place or the other."""
    with client.pipeline(transaction=True) as pipe:
        for queue in queues:
            for name in priority_lists(queue):
                pipe.lrange(name, 0, -1)
        pipe.hvals(UNACKED_KEY)
        *lists, unacked = pipe.execute()
    messages = [_json(raw) for raws in lists for raw in raws]
    for raw in unacked:
        held = _json(raw)
        messages.append(held[0] if isinstance(held, list) and held else None)
    return newest_runs(m for m in messages if isinstance(m, dict))


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class QueuedJobReconciler:
    """Finds swallowed jobs and sends them again; one pass per call of `sweep`.

    Keep one per process across passes: it remembers which jobs it found missing last time.
    """

    def __init__(
        self,
        records: JobRecords,
        *,
        sender: Sender,
        timeout_s: float,
        lease_s: float,
        max_deliveries: int,
        confirm_s: float = CONFIRM_S,
    ) -> None:
        self.records = records
        self.timeout_s = timeout_s
        self.confirm_s = confirm_s
        self.lost_jobs = LostJobSweep(records, sender=sender, timeout_s=timeout_s,
                                      lease_s=lease_s, max_deliveries=max_deliveries)  # fmt: skip
        #: (job id, run, stage) -> when this sweeper first found its message missing.
        self._missing_since: dict[tuple[str, int, str], float] = {}

    def waiting(self, now: float) -> list[Waiting]:
        """Active jobs that have waited at least half the timeout for a stage to start:
        from then on each pass looks for their messages."""
        found = []
        for record, sent_at in self.records.active():
            stage = waiting_stage(record)
            if stage is None:
                continue
            since = waiting_since(record, sent_at)
            if now - since >= self.timeout_s / 2:
                found.append(Waiting(record, stage, since))
        return found

    def find(self) -> list[Waiting]:
        """The jobs swallowed now: waited the timeout, their message missing on this pass
        and on an earlier one at least `confirm_s` ago."""
        now = self.records.now()
        waiting = self.waiting(now)
        if not waiting:
            self._missing_since = {}
            return []
        hosts = set(self.records.media_hosts()) | {w.frames_host for w in waiting} - {None}
        queues = [*SHARED_QUEUES, *(f"cpu.{host}" for host in sorted(hosts))]
        held = held_messages(self.records.redis, queues)
        missing_since, swallowed = {}, []
        for job in waiting:
            if held.get(job.record.job_id, -1) >= job.run:
                continue
            key = (job.record.job_id, job.run, job.stage)
            first = self._missing_since.get(key)  # None: not missing on the last pass
            missing_since[key] = now if first is None else first
            confirmed = first is not None and now - first >= self.confirm_s
            if confirmed and now - job.since >= self.timeout_s:
                swallowed.append(job)
        self._missing_since = missing_since
        return swallowed

    def sweep(self) -> list[LostJob]:
        """Send every swallowed job again that no other sweeper took first; those sent."""
        now = self.records.now()
        sent = []
        for job in self.find():
            lost = LostJob(job.record.job_id, job.stage, restart_stage(job.stage), NOWHERE, "",
                           now - job.since)  # fmt: skip
            if self.lost_jobs.resend(job.record, lost):
                sent.append(lost)
        return sent
