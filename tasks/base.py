"""The base of every stage task: stage bookkeeping in the job record and failure reporting."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from worker.records import get_records

log = get_task_logger(__name__)

#: Retry policy of the network stages: exponential backoff with jitter, capped.
NETWORK_RETRY = {
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 8,
}


class StageTask(Task):
    """A stage of one job's chain; the first argument of every stage is the job id.

    Each run notes its start and end in the job record. A stage that fails for good leaves
    the record saying which stage failed and why, and sends the `failed` callback.
    """

    abstract = True
    #: The stage's name in job records and callback timings.
    stage: str = ""
    #: Whether a final failure of this stage sends the `failed` callback.
    reports_failure: bool = True

    def __call__(self, job_id: str, *args: Any, **kwargs: Any) -> Any:
        records = get_records()
        attempt = records.stage_started(job_id, self.stage)
        log.info("job=%s stage %s started (delivery %d)", job_id, self.stage, attempt)
        result = super().__call__(job_id, *args, **kwargs)
        records.stage_finished(job_id, self.stage)
        return result

    def on_failure(
        self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: Any
    ) -> None:
        job_id = args[0]
        log.error("job=%s stage %s failed: %s: %s", job_id, self.stage, type(exc).__name__, exc)
        get_records().fail(job_id, stage=self.stage, error=exc)
        if self.reports_failure:
            from tasks.media import callback  # the media module imports this one

            callback.apply_async((job_id, "failed"), task_id=f"{job_id}:callback:failed")
