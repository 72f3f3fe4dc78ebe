"""Celery's signals as a worker process meets them: its start, and each task it runs.

At start: the node's name and its host's own media queue, then the checks that stop a
worker before it takes a job (malformed test faults, a second host of the same name, speed
options the device cannot run) and the warnings an operator should read first. Around each
task: the job's log context, its stage's seconds and retries in the metrics. Connected when
the `tasks` package is imported.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    celeryd_init,
    task_postrun,
    task_prerun,
    task_retry,
)

from tasks.routing import host_queue
from worker import faults
from worker.flow.callback import callback_auth_line
from worker.jobs.records import get_records
from worker.observe import logs, metrics
from worker.observe.loaded_models import LoadedModels
from worker.settings import get_settings

log = logging.getLogger(__name__)

#: How long a starting worker listens for another live worker of its node name, seconds.
DUPLICATE_NODE_WAIT_S = 2.0

#: How long a GPU pool child may take to load and warm up (WARMUP) before Celery kills it,
#: seconds: a real model's load plus the compilation of its blocks.
WARMUP_LIMIT_S = 1_800


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


@task_postrun.connect
def leave_job_context(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    """Count the run's seconds per stage and outcome (SUCCESS, FAILURE, RETRY)."""
    logs.job_context.set(None)
    started = _started_at.pop(task_id, None)
    stage = getattr(task, "stage", "")
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


@celeryd_init.connect
def name_the_node_after_worker_host(instance: Any, **_: Any) -> None:
    """The node name is `<name>@<WORKER_HOST>`: `-n gpu@%h` keeps its name part, and the
    host part is WORKER_HOST (the machine's hostname unless set), so node names are unique
    per host by construction, also for several simulated hosts on one machine. Set here,
    before the worker sets up logging, its pool and its consumer, which all read it."""
    name = instance.hostname.partition("@")[0]
    instance.hostname = f"{name}@{get_settings().worker_host}"


@celeryd_after_setup.connect
def consume_own_host_queue(instance: Any, **_: Any) -> None:
    """A media worker (`-Q cpu`) also consumes `cpu.<WORKER_HOST>`, where the media stages
    of the jobs generated on this host are sent (tasks/routing.py). Added here, as Celery's
    docs add a per-worker queue, so the process table and compose keep `-Q cpu` and no
    operator has to spell the host queue (or can get it wrong)."""
    queues = instance.app.amqp.queues
    if "cpu" in queues.consume_from:
        queues.select_add(host_queue(get_settings().worker_host))


@celeryd_after_setup.connect
def refuse_malformed_test_faults(**_: Any) -> None:
    """A typo in WAN_TEST_FAULT stops the worker: it must never pass for a fault that did not
    fire. SystemExit, since Celery logs and ignores a signal handler's ordinary exceptions."""
    try:
        faults.rules()
    except ValueError as e:
        raise SystemExit(str(e)) from e


@celeryd_after_setup.connect
def refuse_a_second_host_of_the_same_name(sender: str, instance: Any, **_: Any) -> None:
    """A worker whose node name another live worker answers to stops here (exit code 78,
    EX_CONFIG): two hosts run with one WORKER_HOST, so one host's media worker would take
    the media stages of jobs whose frames are in the other's spool.

    Celery's own mechanism: a `ping` addressed to this node name, before this worker answers
    pings itself. Only live workers answer, so nothing stale is left behind by a crash or a
    restart. Connected before anything that writes what the other worker owns (its entry of
    loaded models); after the test-fault check, whose typo is the first thing to fix.
    """
    answers = instance.app.control.ping(
        destination=[sender], timeout=DUPLICATE_NODE_WAIT_S, limit=1
    )
    if answers:
        log.critical(
            "another live worker is named %s: WORKER_HOST=%s is already used by another host. "
            "Give each host its own WORKER_HOST (every process of one host shares it, and "
            "its spool); this worker does not start", sender, get_settings().worker_host,
        )  # fmt: skip
        raise SystemExit(os.EX_CONFIG)


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
    else:
        log.info(callback_auth_line(settings))
    if "gpu" in queues and settings.wan_model_path is None:
        log.error("WAN_MODEL_PATH is not set: every generation will fail until it points at "
                  "Wan2.1-T2V-1.3B in diffusers format")  # fmt: skip
    if "enhance" in queues and settings.qwen_model_path is None:
        log.warning("QWEN_MODEL_PATH is not set: enhanced job types run with the user's prompt "
                    "(enhancement_fallback_reason: no_model)")  # fmt: skip


@celeryd_after_setup.connect
def check_speed_options(instance: Any, **_: Any) -> None:
    """A GPU worker whose speed options the device cannot run stops here, before it takes a
    job, with one line naming each setting (exit code 78, EX_CONFIG: a supervisor's restart
    would not help). Celery's signal dispatch logs and swallows exceptions: SystemExit passes.
    """
    if "gpu" not in instance.app.amqp.queues.consume_from:
        return  # the media and enhancement workers never import torch
    settings = get_settings()
    if settings.speed_options_to_check():  # else torch stays out of the main process
        from worker.generation import speed

        try:
            speed.check(settings)
        except speed.SpeedOptionRefused as e:
            log.critical("the GPU worker cannot start: %s", e)
            raise SystemExit(os.EX_CONFIG) from e
    if settings.warmup:  # the pool child loads and warms up before it reports up
        instance.app.conf.worker_proc_alive_timeout = WARMUP_LIMIT_S
