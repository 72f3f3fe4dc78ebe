"""The `generate` stage, on the GPU queue: one pool child holds the WAN pipelines for good.

A job's references are downloaded here, before any GPU work and before `processing` is
sent: a transient failure (timeout, connection error, 429, 5xx) retries this task with
Celery's exponential backoff and jitter; a reference that is refused, undecodable or still
failing after `REFERENCE_RETRIES` retries makes the job text-only, and the callback says why.
Out of GPU memory, the generation runs again at a lower quality preset
(`worker.generation.fallback`); `WAN_TEST_FAULT` can make any denoising step fail. A video
longer than one pass is made window by window (`worker.generation.continuation`), each
window noted in the record as it is done, so a later delivery on this host goes on at the
first window not done.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger

from media import spool
from tasks.app import app
from tasks.generation_stage import (
    GenerateTask,
    progress_callback,
    record_generation,
    start_processing,
)
from worker import faults
from worker.errors import JobCancelled, ModelNotConfigured
from worker.flow.callback import notify_processing
from worker.flow.job_control import raise_if_cancelled
from worker.jobs import fencing
from worker.jobs.model import SEED_MAX, Job, PresetName
from worker.jobs.records import JobRecord, JobRecords, get_records, run_of_task
from worker.observe.metrics import QUALITY_DEGRADATIONS, Metrics
from worker.observe.progress import Progress
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from pathlib import Path

    from worker.generation import StepHook
    from worker.generation.continuation import WindowStepHook
    from worker.generation.windows import Continuation, Window

log = get_task_logger(__name__)


@app.task(base=GenerateTask, bind=True, name="wan.generate", stage="generate")
def generate(self: GenerateTask, job_id: str) -> None:
    from tasks import image_batch  # torch comes in with it, in the GPU pool child only
    from worker.generation import generate as run
    from worker.generation import gpu_memory, speed, windows
    from worker.generation.fallback import generate_within_memory
    from worker.generation.previews import Previewer

    settings = get_settings()
    records = get_records()
    record = records.get(job_id)
    job = record.job
    continuation = None
    if windows.windowed(job, settings):
        continuation = windows.Continuation.of(settings)  # a setting that cannot work: named
        require_vace(job, settings)
    elif job.reference_mode != "none" and not job.image_to_image:
        require_vace(job, settings)
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

    def on_window_step(quality: PresetName, count: int) -> WindowStepHook:
        def step_done(window: int, done: int, total: int) -> None:
            fencing.raise_if_lost()  # the lease went to another run: stop denoising here
            progress.step("generate", done, total, window=(window, count))
            previewer.step(done, total, window=window if count > 1 else None)  # in a thread
            raise_if_cancelled(records, job_id)  # raised out of the pipeline: no VAE decode
            faults.hit(faults.step_point(done), job_id, preset=quality)
            faults.hit(faults.window_step_point(window, done), job_id, preset=quality)

        return step_done

    def on_step(quality: PresetName) -> StepHook:
        step = on_window_step(quality, 1)
        return lambda done, total: step(1, done, total)

    def on_degrade(tried: PresetName, next_quality: PresetName) -> None:
        Metrics(records.redis).count(QUALITY_DEGRADATIONS, tried, next_quality)
        progress.stage_restarted(
            "generate", f"out of GPU memory at quality {tried}: running again at {next_quality}"
        )

    job = as_enhanced(job, record.value("enhancement") or {})
    job = speed.as_run(job, settings)  # a fast type may run on the turbo checkpoint
    if continuation is None:
        if image_batch.run_with_waiting(self, settings, records, job, seed=seed,
                                        progress=progress):  # fmt: skip
            return  # made in one pipeline call with waiting images (tasks/image_batch.py)
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
    else:
        from worker.generation.continuation import generate_long

        frames_dir = spool.windows_dir(settings.spool_dir, job_id)
        done = WindowsDone(records, record, settings, continuation, frames_dir)
        count = len(windows.plan(job, continuation))
        try:
            produced = generate_within_memory(
                job,
                lambda run_as: generate_long(
                    self.pipelines,
                    run_as,
                    seed=seed,
                    references=images,
                    continuation=continuation,
                    frames_dir=frames_dir,
                    first_window=done.first_unfinished(),
                    fallback_reason=fallback_reason,
                    on_step=on_window_step(run_as.quality, count),
                    log=done,
                ),
                on_degrade=on_degrade,
            )
        except SoftTimeLimitExceeded:
            if not done.finished_here:
                raise
            log.warning("job=%s past its soft time limit after %d new windows: going on from "
                        "window %d in a new delivery", job_id, done.finished_here,
                        done.first_unfinished())  # fmt: skip
            raise self.wait_for_other_run(countdown=0) from None
    self.note_loaded(settings, self.request.hostname)
    peak_mib = gpu_memory.report(Metrics(records.redis), self.request.hostname)
    record_generation(self, settings, records, produced, seed=seed, peak_mib=peak_mib,
                      notes=storyboard(record.job))  # fmt: skip


def as_enhanced(job: Job, enhancement: dict[str, Any]) -> Job:
    """The job with the prompts WAN receives: the enhanced prompt, or a storyboard's
    enhanced segment prompts, where the enhance stage made them."""
    segment_prompts = enhancement.get("enhanced_segment_prompts")
    if segment_prompts:
        pairs = zip(job.segments, segment_prompts, strict=True)
        segments = tuple(segment.model_copy(update={"prompt": prompt}) for segment, prompt in pairs)
        return job.model_copy(update={"segments": segments})
    return job.model_copy(update={"prompt": enhancement.get("enhanced_prompt") or job.prompt})


def storyboard(job: Job) -> dict[str, Any]:
    """A storyboard's segments as the user wrote them, each with its first and last frame."""
    from worker.generation.windows import segment_ranges

    return {"segments": segment_ranges(job)} if job.segments else {}


def require_vace(job: Job, settings: Settings) -> None:
    """A job that needs VACE (reference frames, a long video) on a worker without it fails
    naming WAN_VACE_MODEL_PATH."""
    from worker.generation.load import vace_model_dir

    try:
        vace_model_dir(settings)
    except ModelNotConfigured as e:
        if job.reference_mode != "none":
            raise
        raise ModelNotConfigured(
            f"a video of {job.frames} frames is made window by window with VACE, and {e}"
        ) from e


class WindowsDone:
    """A long video's windows in the job record: which are in this host's spool (`windows`:
    host, settings, windows done, pipeline calls per window), written as each window starts
    and ends, read back by a later delivery to go on at the first window not done. The spool
    is per host: on another host, or after the continuation settings changed, the video
    starts again from window 1."""

    def __init__(
        self,
        records: JobRecords,
        record: JobRecord,
        settings: Settings,
        continuation: Continuation,
        frames_dir: Path,
    ) -> None:
        self.records = records
        self.job_id = record.job_id
        self.here = {"host": settings.worker_host, "settings": continuation.described()}
        state = record.value("windows") or {}
        same = all(state.get(name) == value for name, value in self.here.items())
        self.done = min(state.get("done", 0), spool.windows_written(frames_dir)) if same else 0
        self.runs: dict[str, int] = state.get("runs", {}) if same else {}
        #: Windows this delivery finished.
        self.finished_here = 0

    def first_unfinished(self) -> int:
        return self.done + 1

    def started(self, window: Window) -> None:
        self.runs[str(window.number)] = self.runs.get(str(window.number), 0) + 1
        self._write()

    def finished(self, window: Window) -> None:
        self.done = window.number
        self.finished_here += 1
        self._write()

    def _write(self) -> None:
        self.records.update(self.job_id, windows=self.here | {"done": self.done,
                                                               "runs": self.runs})  # fmt: skip


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
