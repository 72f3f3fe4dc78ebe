"""Worker bootsteps: housekeeping that runs inside the Celery worker, on its own timer."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from media import spool
from worker.records import FINAL_STATUSES, get_records
from worker.settings import get_settings

log = logging.getLogger(__name__)

#: Statuses after which nothing will read a job's spool again (a callback retry needs none).
DONE_STATUSES = FINAL_STATUSES | {"delivery_failed"}


def job_running(job_id: str) -> bool:
    """Whether a stage may still read the job's spool: its record exists and is not final."""
    status = get_records().get(job_id).status
    return status is not None and status not in DONE_STATUSES


class SpoolSweep(bootsteps.StartStopStep):
    """Every SPOOL_SWEEP_INTERVAL_S, removes spool directories older than SPOOL_ORPHAN_AGE_S
    whose job is not running: what a worker killed mid-job or a lost record left behind.

    Only in workers that consume the `cpu` queue: the media worker of each host owns the
    host's spool (its stages read and free it), and one sweeper per host is enough.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def include_if(self, worker: Any) -> bool:
        return "cpu" in worker.app.amqp.queues.consume_from

    def start(self, worker: Any) -> None:
        interval_s = get_settings().spool_sweep_interval_s
        self.timer_ref = worker.timer.call_repeatedly(interval_s, self.sweep, priority=10)
        log.info("spool sweep every %g s", interval_s)

    def stop(self, worker: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def sweep(self) -> None:
        """One pass; an error (Redis away, a disk problem) is logged and the next pass retries."""
        settings = get_settings()
        try:
            removed = spool.sweep_orphans(
                settings.spool_dir, older_than_s=settings.spool_orphan_age_s, running=job_running
            )
        except Exception:  # the timer's edge: one pass fails, the worker and its timer go on
            log.exception("spool sweep failed")
            return
        for job_id in removed:
            log.warning(
                "job=%s orphan spool directory removed (older than SPOOL_ORPHAN_AGE_S=%g)",
                job_id,
                settings.spool_orphan_age_s,
            )
