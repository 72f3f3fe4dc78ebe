"""The base of every stage task: stage bookkeeping in the job record and failure reporting."""

from __future__ import annotations

import time
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from media import spool
from worker.errors import DeliveryFailed, JobCancelled, TransientError
from worker.job_control import finish_cancelled, raise_if_cancelled, send_final_callback
from worker.records import get_records
from worker.settings import get_settings

log = get_task_logger(__name__)

#: Backoff of every network retry (reference download, upload, callback): exponential from
#: 2 s with full jitter, capped far below the broker's visibility_timeout.
NETWORK_RETRY = {"retry_backoff": 2, "retry_backoff_max": 300, "retry_jitter": True}


class StageTask(Task):
    """A stage of one job's chain; the first argument of every stage is the job id.

    Each run notes its start and end in the job record. A stage that fails for good leaves
    the record saying which stage failed and why, frees the job's spool, and sends the
    `failed` callback. A cancelled job's stage stops before it starts.
    """

    abstract = True
    #: The stage's name in job records and callback timings.
    stage: str = ""
    #: Whether a final failure of this stage sends the `failed` callback.
    reports_failure: bool = True
    #: Whether a cancel stops the job before this stage (not before its final callback).
    cancellable: bool = True
    #: A cancel is expected: Celery logs it without a traceback.
    throws = (JobCancelled,)

    def __call__(self, job_id: str, *args: Any, **kwargs: Any) -> Any:
        records = get_records()
        attempt = records.stage_started(job_id, self.stage)
        log.info("job=%s stage %s started (delivery %d)", job_id, self.stage, attempt)
        if self.cancellable:  # after the start is noted: a cancel sees this stage as started
            raise_if_cancelled(records, job_id)
        result = super().__call__(job_id, *args, **kwargs)
        records.stage_finished(job_id, self.stage)
        return result

    def on_failure(
        self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: Any
    ) -> None:
        job_id = args[0]
        spool.remove_job(get_settings().spool_dir, job_id)  # no later stage will read it
        if isinstance(exc, JobCancelled):
            log.info("job=%s cancelled at stage %s", job_id, self.stage)
            if finish_cancelled(get_records(), job_id, stage=self.stage):
                send_final_callback(job_id, "cancelled")
            return
        log.error("job=%s stage %s failed: %s: %s", job_id, self.stage, type(exc).__name__, exc)
        if not self.reports_failure:  # the final callback itself: the job's own outcome stays
            get_records().delivery_failed(job_id, stage=self.stage, error=exc)
            return
        get_records().fail(job_id, stage=self.stage, error=exc)
        send_final_callback(job_id, "failed")


class DeliveryTask(StageTask):
    """Upload and final callback: retried until DELIVERY_RETRY_WINDOW_S has passed.

    Celery's autoretry does the retrying (exponential backoff from 2 s, full jitter, capped
    at `retry_backoff_max`); the window, counted from the stage's first attempt in the job
    record, replaces a retry count. The last countdown is cut to end with the window, so
    the final attempt comes on time. The cap stays far below the broker's
    visibility_timeout: a waiting retry is an unacked message that Redis would hand out a
    second time after it.
    """

    abstract = True
    autoretry_for = (TransientError,)
    retry_backoff = NETWORK_RETRY["retry_backoff"]
    retry_backoff_max = NETWORK_RETRY["retry_backoff_max"]
    retry_jitter = NETWORK_RETRY["retry_jitter"]
    max_retries = None

    def retry(self, *args: Any, exc: BaseException | None = None, **options: Any) -> Any:
        job_id = self.request.args[0]
        window_s = get_settings().delivery_retry_window_s
        first = get_records().get(job_id).first_started(self.stage) or time.time()
        left_s = first + window_s - time.time()
        if exc is not None and left_s <= 0:
            raise DeliveryFailed(
                f"{self.stage} given up after {self.request.retries + 1} attempts in "
                f"{time.time() - first:.0f} s (DELIVERY_RETRY_WINDOW_S={window_s:g}); "
                f"last error: {exc}"
            ) from exc
        if options.get("countdown") is not None:
            options["countdown"] = min(options["countdown"], left_s)
        return super().retry(*args, exc=exc, **options)
