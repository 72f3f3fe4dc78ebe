"""The `generate` stage, on the GPU queue: one pool child holds the WAN pipelines for good.

A job's references are downloaded here, before any GPU work and before `processing` is
sent: a transient failure (timeout, connection error, 429, 5xx) retries this task with
Celery's exponential backoff and jitter; a reference that is refused, undecodable or still
failing after `REFERENCE_RETRIES` retries makes the job text-only, and the callback says why.
Out of GPU memory, the generation runs again at a lower quality preset
(`worker.generation.fallback`); `WAN_TEST_FAULT` can make any denoising step fail.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_init
from celery.utils.log import get_task_logger

from tasks.app import app
from tasks.generation_stage import (
    GenerateTask,
    progress_callback,
    record_generation,
    start_processing,
)
from worker import faults
from worker.errors import JobCancelled
from worker.flow.callback import notify_processing
from worker.flow.job_control import raise_if_cancelled
from worker.jobs import fencing
from worker.jobs.model import SEED_MAX, PresetName
from worker.jobs.records import get_records, run_of_task
from worker.observe.metrics import QUALITY_DEGRADATIONS, Metrics
from worker.observe.progress import Progress
from worker.settings import get_settings

if TYPE_CHECKING:
    from worker.generation import StepHook

log = get_task_logger(__name__)


@app.task(base=GenerateTask, bind=True, name="wan.generate", stage="generate")
def generate(self: GenerateTask, job_id: str) -> None:
    from tasks import image_batch  # torch comes in with it, in the GPU pool child only
    from worker.generation import generate as run
    from worker.generation import gpu_memory, speed
    from worker.generation.fallback import generate_within_memory
    from worker.generation.load import vace_model_dir
    from worker.generation.previews import Previewer

    settings = get_settings()
    records = get_records()
    record = records.get(job_id)
    job = record.job
    if job.reference_mode != "none" and not job.image_to_image:
        vace_model_dir(settings)  # a reference job without VACE fails naming the setting
    images, fallback_reason = self.references(job, settings)
    if fallback_reason is not None:
        log.warning("job=%s reference not used, text only: %s", job_id, fallback_reason)
    # A redelivered job keeps the seed chosen the first time, so its result is the same.
    seed = record.value("seed")
    if seed is None:
        seed = job.seed if job.seed is not None else secrets.randbelow(SEED_MAX + 1)
        records.update(job_id, seed=seed)
    if not start_processing(records, job_id):
        raise JobCancelled(f"job {job_id} was cancelled before its generation started")
    run_number = run_of_task(self.request.id or "", job_id, "generate")
    notify_processing(settings, job_id, run=run_number)

    progress = Progress(
        records, job_id, task=self, notify=progress_callback(settings, job_id, run_number),
        notify_every_s=settings.progress_callback_every_s,
    )  # fmt: skip

    previewer = Previewer(records.redis, job_id, every_s=settings.preview_every_s,
                          max_px=settings.preview_max_px)  # fmt: skip

    def on_step(quality: PresetName) -> StepHook:
        def step_done(done: int, total: int) -> None:
            fencing.raise_if_lost()  # the lease went to another run: stop denoising here
            progress.step("generate", done, total)
            previewer.step(done, total)  # returns at once: made in a thread of its own
            raise_if_cancelled(records, job_id)  # raised out of the pipeline: no VAE decode
            faults.hit(faults.step_point(done), job_id, preset=quality)

        return step_done

    def on_degrade(tried: PresetName, next_quality: PresetName) -> None:
        Metrics(records.redis).count(QUALITY_DEGRADATIONS, tried, next_quality)
        progress.stage_restarted(
            "generate", f"out of GPU memory at quality {tried}: running again at {next_quality}"
        )

    enhancement = record.value("enhancement") or {}
    job = job.model_copy(update={"prompt": enhancement.get("enhanced_prompt") or job.prompt})
    job = speed.as_run(job, settings)  # a fast type may run on the turbo checkpoint
    if image_batch.run_with_waiting(self, settings, records, job, seed=seed, progress=progress):
        return  # made in one pipeline call with compatible waiting images (tasks/image_batch.py)
    produced = generate_within_memory(
        job,
        lambda run_as: run(
            self.pipelines,
            run_as,
            seed=seed,
            references=images,
            fallback_reason=fallback_reason,
            on_step=on_step(run_as.quality),
        ),
        on_degrade=on_degrade,
    )
    self.note_loaded(settings, self.request.hostname)
    peak_mib = gpu_memory.report(Metrics(records.redis), self.request.hostname)
    record_generation(self, settings, records, produced, seed=seed, peak_mib=peak_mib)


@worker_process_init.connect
def warm_up(sender: str, **_: Any) -> None:
    """WARMUP=1: this pool child loads the pipelines and runs one small generation before it
    takes a job, so the first user job pays neither the load nor the compilation.

    Why in `worker_process_init`: Celery writes jobs to a pool child only after the child
    reports up, which it does when this signal's handlers have returned; so the warm-up runs
    before any job, and again in every replacement child (after a crash or
    max_tasks_per_child), in the process that keeps the model. The 4 s Celery allows here
    is raised for WARMUP at start (`tasks.worker_signals.check_speed_options`). A warm-up
    task sent on `worker_ready` could be taken by another GPU worker or wait behind queued
    jobs; a bootstep runs in the parent, which must not touch CUDA before the fork.
    """
    settings = get_settings()
    if not settings.warmup or "gpu" not in app.amqp.queues.consume_from:
        return
    from worker.generation.warmup import warm_up as run_warm_up

    started = time.perf_counter()
    runs = run_warm_up(generate.pipelines)
    generate.note_loaded(settings, sender)
    log.info("warm-up done in %.1f s: pipelines %s loaded, ran %s; taking jobs now",
             time.perf_counter() - started, ", ".join(generate.pipelines.loaded()),
             ", ".join(runs))  # fmt: skip
