"""The base of every stage task: stage bookkeeping in the job record and failure reporting."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.log import get_task_logger

from media import spool
from tasks.chain import SENDER
from worker.errors import (
    DeliveryFailed,
    JobCancelled,
    RunSuperseded,
    StageTimedOut,
    TooManyDeliveries,
    TransientError,
)
from worker.flow.job_control import (
    finish_cancelled,
    give_up,
    raise_if_cancelled,
    send_final_callback,
)
from worker.flow.lanes import leave_waiting
from worker.jobs import fencing
from worker.jobs.fencing import Fence
from worker.jobs.records import JobRecords, get_records, lease_owner, run_of_task
from worker.observe.progress import Progress
from worker.settings import get_settings, soft_limit_setting

log = get_task_logger(__name__)

#: A stage task's `on_failure`.
FailureHandler = Callable[["StageTask", Exception, str, tuple, dict, Any], None]

#: Backoff of every network retry (reference download, upload, callback): exponential from
#: 2 s with full jitter, capped far below the broker's visibility_timeout.
NETWORK_RETRY = {"retry_backoff": 2, "retry_backoff_max": 300, "retry_jitter": True}


def _unless_superseded(on_failure: FailureHandler) -> FailureHandler:
    """A failure handler that acts only while the failed run still owns its job, every
    write of it fenced by that run (worker/jobs/fencing.py): a run whose job was sent again
    meanwhile (its host cut off, then back) frees no spool, writes nothing into the new
    run's record and sends no callback."""

    @functools.wraps(on_failure)
    def handler(
        self: StageTask, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: Any
    ) -> None:
        job_id = args[0]
        fence = Fence(job_id, self.stage, run_of_task(task_id, job_id, self.stage), owner=None)
        try:
            with fencing.fenced(fence):
                get_records().confirm_run(job_id)
                on_failure(self, exc, task_id, args, kwargs, einfo)
        except RunSuperseded as e:
            log.warning("job=%s stage %s failed (%s: %s) in a superseded run: %s", job_id,
                        self.stage, type(exc).__name__, exc, e)  # fmt: skip

    return handler


class StageTask(Task):
    """A stage of one job's chain; the first argument of every stage is the job id.

    Each run notes its start and end in the job record, and holds the stage's lease there
    while it runs: a duplicate delivery waits, a delivery after the end skips the stage,
    and one past MAX_DELIVERIES fails the job (`JobRecords.begin_stage`). A stage that fails
    for good leaves the record saying which stage failed and why, frees the job's spool,
    and sends the `failed` callback; past its soft time limit, the error is `StageTimedOut`
    naming the stage, the limit and its setting. A cancelled job's stage stops before it
    starts.
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
        records, settings = get_records(), get_settings()
        run = run_of_task(self.request.id or "", job_id, self.stage)
        start = records.begin_stage(
            job_id, self.stage, lease_s=settings.stage_lease_s,
            max_deliveries=settings.max_deliveries, run=run,
        )  # fmt: skip
        if start.outcome == "superseded":
            # The job was sent again (the lost-job sweep, an operator's retry) with new task
            # ids; this old message came back from a dead worker. Its chain stops here: the
            # new run has its own.
            log.info("job=%s stage %s: message of a superseded run skipped", job_id, self.stage)
            raise Ignore()
        if start.outcome == "done":
            # Not Celery's Ignore: the run that finished may have died before it sent the
            # next stage, so this delivery returns and the chain goes on; every later stage
            # skips itself the same way if it ran already.
            log.info("job=%s stage %s finished before: delivery skipped", job_id, self.stage)
            return None
        if start.outcome == "busy":
            # Another live run holds the stage. This message may be the stage's only live
            # one: Redis's visibility timeout moves a long-running message back to the queue,
            # out of the unacknowledged set, so if the running worker died after this one
            # were acked, nothing would deliver the stage again. Wait it out as a retry
            # (neither a delivery, a retry nor a failure); it then finds `done` or a dead lease.
            log.info("job=%s stage %s is running elsewhere: retry in %.0f s", job_id,
                     self.stage, start.lease_left_s + 1)  # fmt: skip
            raise self.wait_for_other_run(countdown=start.lease_left_s + 1)
        if start.outcome == "too_many":
            raise TooManyDeliveries.of(self.stage, start.deliveries, settings.max_deliveries)
        log.info("job=%s stage %s started (delivery %d)", job_id, self.stage, start.deliveries)
        if self.stage == "generate":  # it waits in its lane no more (worker/flow/lanes.py)
            leave_waiting(records, settings, job_id)
        progress = Progress(records, job_id, task=self)  # skipped deliveries report nothing
        progress.stage_started(self.stage)
        with leased(records, job_id, self.stage, settings.stage_lease_s, run=run):
            if self.cancellable:  # after the start is noted: a cancel sees this stage started
                raise_if_cancelled(records, job_id)
            result = super().__call__(job_id, *args, **kwargs)
            records.stage_finished(job_id, self.stage)
        progress.stage_finished(self.stage)
        return result

    def wait_for_other_run(self, *, countdown: float) -> Retry:
        """Send this message again after `countdown` seconds as Celery's `retry` does, but
        with its retry count unchanged: a wait is no attempt, so it uses up no budget counted
        in retries (REFERENCE_RETRIES, the backoff of network retries)."""
        again = self.signature_from_request(countdown=countdown, retries=self.request.retries)
        try:
            again.apply_async()
        except Exception as e:  # as Celery's `retry`: this duplicate is dropped
            raise Reject(e, requeue=False) from e
        return Retry(when=countdown, sig=again)

    @_unless_superseded
    def on_failure(
        self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: Any
    ) -> None:
        job_id = args[0]
        leave_waiting(get_records(), get_settings(), job_id)  # failed before generating
        if isinstance(exc, SoftTimeLimitExceeded):
            exc = self.timed_out(job_id)
        elif isinstance(exc, TimeLimitExceeded):
            exc = self.killed_at_hard_limit(job_id)
        spool.remove_job(get_settings().spool_dir, job_id)  # no later stage will read it
        if isinstance(exc, JobCancelled):
            log.info("job=%s cancelled at stage %s", job_id, self.stage)
            if finish_cancelled(get_records(), job_id, stage=self.stage):
                send_final_callback(job_id, "cancelled", sender=SENDER)
            return
        log.error("job=%s stage %s failed: %s: %s", job_id, self.stage, type(exc).__name__, exc)
        if not self.reports_failure:  # the final callback itself: the job's own outcome stays
            get_records().delivery_failed(job_id, stage=self.stage, error=exc)
            return
        get_records().fail(job_id, stage=self.stage, error=exc)
        if isinstance(exc, TooManyDeliveries):
            give_up(get_records(), job_id)
        send_final_callback(job_id, "failed", sender=SENDER)

    def timed_out(self, job_id: str) -> StageTimedOut:
        """What the user reads when job `job_id`'s stage ran past its soft time limit."""
        soft_s, _ = get_settings().stage_time_limits()[self.stage]
        return StageTimedOut(
            f"{self.stage} ran past its soft time limit of {soft_s:g} s "
            f"({soft_limit_setting(self.stage)})"
        )

    def killed_at_hard_limit(self, job_id: str) -> StageTimedOut:
        """What the user reads when the pool child was killed at this stage's hard time
        limit (it did not stop at the soft one). Celery's `Request.on_timeout` calls
        `on_failure` with TimeLimitExceeded in the worker's main process, the child gone:
        the task's request is empty there, so the job comes as an argument."""
        _, hard_s = get_settings().stage_time_limits()[self.stage]
        return StageTimedOut(
            f"{self.stage} was killed at its hard time limit of {hard_s:g} s "
            f"({soft_limit_setting(self.stage)} + HARD_LIMIT_GRACE_S): it did not stop at "
            "the soft limit"
        )


@contextmanager
def leased(
    records: JobRecords,
    job_id: str,
    stage: str,
    lease_s: float,
    *,
    run: int | None,
    fence_writes: bool = True,
) -> Iterator[None]:
    """Keep this process's lease on the stage alive while the block runs (a daemon thread
    renews it every third of the lease), and release it however the block ends: success,
    failure, Celery retry or cancel. A killed process renews nothing: its lease runs out.

    Every record write in the block is fenced by the run and the lease (worker/jobs/fencing.py);
    once one is refused, or the heartbeat finds the lease gone, the run stops: its message
    is dropped (Celery's Ignore), so neither its chain nor its failure handler go on.
    `fence_writes=False` keeps the lease alone: the other jobs of an image batch, held by the
    batch's head, whose own run is what a lost lease stops."""
    stop = threading.Event()
    fence = Fence(job_id, stage, run, owner=lease_owner())

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if records.renew_stage(job_id, stage, lease_s=lease_s):
                    continue
                if fencing.holds(records.redis, records.key(job_id), fence):
                    return  # released on purpose (handed back at shutdown): nothing to stop
                log.warning("job=%s stage %s: lease lost to another run: stopping",
                            job_id, stage)  # fmt: skip
                fence.lost.set()
                return
            except redis.RedisError as e:  # Redis restarting: try again at the next beat
                log.warning("job=%s stage %s: lease not renewed: %s", job_id, stage, e)

    heartbeat = threading.Thread(target=renew, name=f"lease-{stage}", daemon=True)
    heartbeat.start()
    try:
        with fencing.fenced(fence) if fence_writes else nullcontext():
            yield
    except RunSuperseded as e:
        log.warning("%s", e)
        raise Ignore() from e
    finally:
        stop.set()
        records.release_stage(job_id, stage)


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
        records = get_records()
        now = records.now()  # `first_started:<stage>` is on Redis's clock too
        first = records.get(job_id).first_started(self.stage) or now
        left_s = first + window_s - now
        if exc is not None and left_s <= 0:
            raise DeliveryFailed(
                f"{self.stage} given up after {self.request.retries + 1} attempts in "
                f"{now - first:.0f} s (DELIVERY_RETRY_WINDOW_S={window_s:g}); "
                f"last error: {exc}"
            ) from exc
        if exc is not None and options.get("countdown") is not None:
            # A retry after an error ends with the window; a wait for a live run (`busy`,
            # no error) is not an attempt, and a window already run out must not turn it
            # into an immediate loop.
            options["countdown"] = min(options["countdown"], left_s)
        return super().retry(*args, exc=exc, **options)
