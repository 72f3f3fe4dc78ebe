"""The promotion sweep: no video starves behind a stream of images (worker/lanes.py)."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from worker.lanes import GPU_QUEUE, promote_overdue
from worker.records import get_records
from worker.settings import get_settings

log = logging.getLogger(__name__)


class PromotionSweep(bootsteps.StartStopStep):
    """Every `Settings.promote_sweep_interval_s()`, moves the generate messages of jobs
    waiting longer than PROMOTE_AFTER_S to the top priority step.

    In every worker that consumes the `gpu` queue: the ones whose takes it orders. Several
    at once are harmless (each message moves once, atomically).
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def include_if(self, worker: Any) -> bool:
        return GPU_QUEUE in worker.app.amqp.queues.consume_from

    def start(self, worker: Any) -> None:
        interval_s = get_settings().promote_sweep_interval_s()
        self.timer_ref = worker.timer.call_repeatedly(interval_s, self.sweep, priority=10)
        log.info("promotion sweep every %g s", interval_s)

    def stop(self, worker: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def sweep(self) -> None:
        """One pass; an error (Redis away) is logged and the next pass retries."""
        try:
            promote_overdue(get_records(), get_settings())
        except Exception:  # the timer's edge: one pass fails, the worker and its timer go on
            log.exception("promotion sweep failed")
