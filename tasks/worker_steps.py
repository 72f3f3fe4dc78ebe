"""Worker bootsteps: housekeeping that runs inside the Celery worker, on its own timer."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import bootsteps

from media import spool
from tasks.app import app
from tasks.chain import SENDER
from worker.flow.lanes import GPU_QUEUE, promote_overdue
from worker.flow.leftovers import drop_leftovers
from worker.flow.lost_jobs import LostJobSweep
from worker.flow.outbox import FinalCallbackSweep
from worker.flow.reconcile import QueuedJobReconciler
from worker.jobs.records import FINAL_STATUSES, get_records
from worker.settings import get_settings

log = logging.getLogger(__name__)

#: Statuses after which nothing will read a job's spool again (a callback retry needs none).
DONE_STATUSES = FINAL_STATUSES | {"delivery_failed"}


def job_running(job_id: str) -> bool:
    """Whether a stage may still read the job's spool: its record exists and is not final."""
    status = get_records().get(job_id).status
    return status is not None and status not in DONE_STATUSES


class WorkerChore(bootsteps.StartStopStep):
    """A chore that workers consuming `queue` run every `interval_s`, on the worker's timer.

    An error of one pass (Redis away, a disk problem) is logged, and the next pass tries
    again.
    """

    requires = {"celery.worker.components:Timer"}
    #: What the log calls it.
    what = ""
    #: The queue whose workers run the chore.
    queue = ""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def include_if(self, worker: Any) -> bool:
        return self.queue in worker.app.amqp.queues.consume_from

    def interval_s(self) -> float:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def start(self, worker: Any) -> None:
        self.timer_ref = worker.timer.call_repeatedly(self.interval_s(), self.tick, priority=10)
        log.info("%s every %g s", self.what, self.interval_s())

    def stop(self, worker: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def tick(self) -> None:
        try:
            self.run()
        except Exception:  # the timer's edge: one pass fails, the worker and its timer go on
            log.exception("%s failed", self.what)


class MediaWorkerChore(WorkerChore):
    """A chore of the media worker (`cpu` queue): there is one per host, its spool's owner."""

    queue = "cpu"


class SpoolSweep(MediaWorkerChore):
    """Every SPOOL_SWEEP_INTERVAL_S, removes spool directories older than SPOOL_ORPHAN_AGE_S
    whose job is not running: what a worker killed mid-job or a lost record left behind."""

    what = "spool sweep"

    def interval_s(self) -> float:
        return get_settings().spool_sweep_interval_s

    def run(self) -> None:
        settings = get_settings()
        removed = spool.sweep_orphans(
            settings.spool_dir, older_than_s=settings.spool_orphan_age_s, running=job_running
        )
        for job_id in removed:
            log.warning(
                "job=%s orphan spool directory removed (older than SPOOL_ORPHAN_AGE_S=%g)",
                job_id,
                settings.spool_orphan_age_s,
            )


class LostJobSweeper(MediaWorkerChore):
    """Says this host's media worker lives, then sends lost jobs again (worker/flow/lost_jobs.py)
    and final callbacks unsent or lost (worker/flow/outbox.py), every fifth of
    LOST_JOB_TIMEOUT_S (at most a minute).

    In the media workers because there is one per host and they need no GPU: every live
    host sweeps, so a job is rescued as long as any host lives; the resend is atomic on the
    job record, so sweeping on several hosts at once sends a job once. The heartbeat (a
    field per host with Redis's time, not a Celery ping) answers "no media worker on this
    host for LOST_JOB_TIMEOUT_S" from one read, without waiting on a broadcast.

    The same pass sends again the jobs whose message a dying consumer swallowed
    (worker/flow/reconcile.py) and drops what outlived its job or host (worker/flow/leftovers.py).
    """

    what = "lost-job sweep"

    def interval_s(self) -> float:
        return get_settings().lost_job_sweep_interval_s()

    def run(self) -> None:
        settings = get_settings()
        records = get_records()
        records.media_heartbeat(settings.worker_host)
        LostJobSweep(
            records,
            sender=SENDER,
            timeout_s=settings.lost_job_timeout_s,
            lease_s=settings.stage_lease_s,
            max_deliveries=settings.max_deliveries,
        ).sweep()
        FinalCallbackSweep(
            records,
            sender=SENDER,
            timeout_s=settings.lost_job_timeout_s,
            lease_s=settings.stage_lease_s,
        ).sweep()
        get_reconciler().sweep()
        drop_leftovers(records)


@lru_cache(maxsize=1)
def get_reconciler() -> QueuedJobReconciler:
    """This process's reconciler on its record store, kept from one pass to the next."""
    settings = get_settings()
    return QueuedJobReconciler(
        get_records(),
        sender=SENDER,
        timeout_s=settings.lost_job_timeout_s,
        lease_s=settings.stage_lease_s,
        max_deliveries=settings.max_deliveries,
    )


class PromotionSweep(WorkerChore):
    """Every `Settings.promote_sweep_interval_s()`, moves the generate messages of jobs
    waiting longer than PROMOTE_AFTER_S to the top priority step (worker/flow/lanes.py), so no
    video starves behind a stream of images.

    In every worker that consumes the `gpu` queue: the ones whose takes it orders. Several
    at once are harmless (each message moves once, atomically).
    """

    what = "promotion sweep"
    queue = GPU_QUEUE

    def interval_s(self) -> float:
        return get_settings().promote_sweep_interval_s()

    def run(self) -> None:
        promote_overdue(get_records(), get_settings())


app.steps["worker"].update({SpoolSweep, LostJobSweeper, PromotionSweep})
