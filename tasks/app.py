"""The Celery app; every process (workers, bridge, flower) shares this one."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    task_postrun,
    task_prerun,
    task_retry,
)

from worker.observe import logs, metrics
from worker.observe.loaded_models import LoadedModels
from worker.observe.progress import Progress
from worker.records import get_records
from worker.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("wan")
app.config_from_object("celeryconfig")


@after_setup_logger.connect
@after_setup_task_logger.connect
def use_our_log_format(logger: logging.Logger, **_: Any) -> None:
    """LOG_FORMAT for every worker line; the pool children inherit it at the fork."""
    logs.apply(logger, get_settings())


@task_prerun.connect
def enter_job_context(task_id: str, task: Task, args: tuple, **_: Any) -> None:
    """Every line the task logs from here on names its job, stage, task and worker."""
    fields = {"task_id": task_id, "worker": task.request.hostname or ""}
    if getattr(task, "stage", "") and args:
        fields |= {"job_id": str(args[0]), "stage": task.stage}
    else:
        fields |= logs.context_of_task(task_id)
    logs.job_context.set(fields)
    _started_at[task_id] = time.perf_counter()
    if "stage" in fields and getattr(task, "stage", ""):
        Progress(get_records(), fields["job_id"], task=task).stage_started(task.stage)


@task_postrun.connect
def leave_job_context(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    """Count the run's seconds per stage and outcome (SUCCESS, FAILURE, RETRY)."""
    logs.job_context.set(None)
    started = _started_at.pop(task_id, None)
    stage = getattr(task, "stage", "")
    if stage and state == "SUCCESS" and task.request.args:
        Progress(get_records(), str(task.request.args[0]), task=task).stage_finished(stage)
    if started is not None and stage:
        outcome = (state or "unknown").lower()
        _metrics().observe(metrics.STAGE_SECONDS, time.perf_counter() - started, task.stage,
                           outcome)  # fmt: skip


@task_retry.connect
def count_retry(sender: Task, **_: Any) -> None:
    _metrics().count(metrics.RETRIES, getattr(sender, "stage", "") or sender.name)


#: perf_counter at the start of each task run in this process, by task id.
_started_at: dict[str, float] = {}


def _metrics() -> metrics.Metrics:
    return metrics.Metrics(get_records().redis)


@celeryd_after_setup.connect
def forget_models_of_previous_run(sender: str, **_: Any) -> None:
    """A (re)started worker holds no model yet, whatever its dead predecessor held."""
    LoadedModels(get_records().redis).clear(sender)


@celeryd_after_setup.connect
def warn_about_settings(instance: Any, **_: Any) -> None:
    """Say at start what will go wrong later, so the operator reads it before the first job."""
    settings = get_settings()
    queues = set(instance.app.amqp.queues.consume_from)
    if not settings.job_callback_secret:
        log.warning("JOB_CALLBACK_SECRET is not set: callbacks go out unsigned (the platform 401s)")
    if not settings.callback_url:
        log.warning("neither CALLBACK_URL nor SUPABASE_URL is set: no callback will be sent")
    if "gpu" in queues and settings.wan_model_path is None:
        log.error("WAN_MODEL_PATH is not set: every generation will fail until it points at "
                  "Wan2.1-T2V-1.3B in diffusers format")  # fmt: skip
    if "enhance" in queues and settings.qwen_model_path is None:
        log.warning("QWEN_MODEL_PATH is not set: enhanced job types run with the user's prompt "
                    "(enhancement_fallback_reason: no_model)")  # fmt: skip
