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
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from media import references, spool
from tasks.app import app
from tasks.base import NETWORK_RETRY, StageTask
from worker import faults
from worker.callback import notify_processing
from worker.errors import JobCancelled, ReferenceUnusable, TransientError
from worker.job_control import raise_if_cancelled
from worker.jobs import SEED_MAX, Job, PresetName
from worker.observe.loaded_models import LoadedModels
from worker.observe.metrics import QUALITY_DEGRADATIONS, Metrics
from worker.observe.progress import Notify, Progress
from worker.records import JobRecords, get_records, run_of_task
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from PIL import Image

    from worker.generation import Pipelines, StepHook
    from worker.generation.fallback import Produced

log = get_task_logger(__name__)

#: Atomically: the job is `processing` now, unless a cancel came first (a job cancelled
#: while `queued` has had its `cancelled` callback). KEYS: the record; ARGV: TTL. 1 if so.
_START_PROCESSING_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], 'cancel_requested_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'processing')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class GenerateTask(StageTask):
    """Loads the pipelines on first use in the pool child, after the fork, and keeps them.

    Never at import (the API, the media worker and tests would pay) and never in
    `worker_process_init` (Celery gives it 4 s). Job N+1 reuses what job N loaded.
    """

    abstract = True
    _pipelines: Pipelines | None = None
    #: Pipelines already reported to the loaded-models registry by this child.
    _noted: set[str] = set()

    @property
    def pipelines(self) -> Pipelines:
        if self._pipelines is None:
            from worker.generation import Pipelines  # torch comes in here, in the GPU child only

            type(self)._pipelines = Pipelines(get_settings())
        return self._pipelines

    def note_loaded(self, settings: Settings, hostname: str) -> None:
        """Tell /health which pipelines this child holds now (written when that changes) and
        the speed options they run with."""
        from worker.generation import speed

        paths = {"t2v": settings.wan_model_path, "vace": settings.wan_vace_model_path,
                 "v2v": settings.wan_model_path}  # fmt: skip
        registry = LoadedModels(get_records().redis)
        options = speed.in_force(settings, self.pipelines.device)
        for name in self.pipelines.loaded():
            if name not in self._noted:
                registry.note(hostname, f"wan_{name}", path=str(paths[name]), loaded=True,
                              details={"speed_options": options})  # fmt: skip
                self._noted.add(name)

    def references(self, job: Job, settings: Settings) -> tuple[dict[str, Image.Image], str | None]:
        """The job's prepared references, or none and the reason to run text-only."""
        if not job.reference_urls:
            return {}, None
        guard = references.Guard(references.parse_hosts(settings.reference_allowed_hosts))
        try:
            images = references.load_references(
                job.reference_urls,
                width=job.width,
                height=job.height,
                guard=guard,
                timeout_s=settings.reference_timeout_s,
            )
        except ReferenceUnusable as e:
            return {}, str(e)
        except TransientError as e:
            retries = self.request.retries
            if retries >= settings.reference_retries:
                return {}, f"{e} (still failing after {retries} retries)"
            countdown = get_exponential_backoff_interval(
                NETWORK_RETRY["retry_backoff"],
                retries,
                NETWORK_RETRY["retry_backoff_max"],
                NETWORK_RETRY["retry_jitter"],
            )
            log.warning("job=%s %s: retry %d in %d s", job.id, e, retries + 1, countdown)
            raise self.retry(
                exc=e, countdown=countdown, max_retries=settings.reference_retries
            ) from e
        return images, None

    def on_failure(
        self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: Any
    ) -> None:
        """A failed generation (a time limit, out of memory) leaves no GPU cache behind. At
        the hard time limit this runs in the worker's main process (the child that held the
        GPU is gone): nothing to free, and torch stays out of the main process."""
        if not isinstance(exc, TimeLimitExceeded):
            from worker.generation import gpu_memory

            gpu_memory.free()
        super().on_failure(exc, task_id, args, kwargs, einfo)


def start_processing(records: JobRecords, job_id: str) -> bool:
    """Mark the job `processing`; False when it was cancelled meanwhile (its references were
    downloading, say): then it stops here, and no `processing` follows its `cancelled`."""
    script = records.redis.register_script(_START_PROCESSING_SCRIPT)
    return bool(script(keys=[records.key(job_id)], args=[records.ttl_s]))


def progress_callback(settings: Settings, job_id: str, run: int | None) -> Notify | None:
    """With PROGRESS_CALLBACKS, `processing` callbacks carrying the progress, sent from a
    thread of their own: the denoising loop never waits for the platform."""
    if not settings.progress_callbacks:
        return None

    def notify(progress: dict) -> None:
        threading.Thread(
            target=notify_processing, args=(settings, job_id, progress), kwargs={"run": run},
            daemon=True,
        ).start()  # fmt: skip

    return notify


@app.task(base=GenerateTask, bind=True, name="wan.generate", stage="generate")
def generate(self: GenerateTask, job_id: str) -> None:
    from tasks import image_batch
    from worker.generation import generate as run
    from worker.generation import gpu_memory, speed
    from worker.generation.fallback import generate_within_memory
    from worker.generation.load import vace_model_dir

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

    def on_step(quality: PresetName) -> StepHook:
        def step_done(done: int, total: int) -> None:
            progress.step("generate", done, total)
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


def record_generation(
    task: GenerateTask,
    settings: Settings,
    records: JobRecords,
    produced: Produced,
    *,
    seed: int,
    peak_mib: float | None,
    batch: dict[str, Any] | None = None,
) -> None:
    """The frames into this host's spool, and what made them into the job's record (the
    media stages and the completed callback read it). `batch`: the batch it was made in."""
    from worker.generation.provenance import describe

    generated, job = produced.generated, produced.job
    frames = generated.frames
    path = spool.write_frames(spool.frames_path(settings.spool_dir, job.id), frames)
    frame_num, height, width, _ = frames.shape
    provenance = describe(task.pipelines, job, seed=seed,
                          wan_task=generated.metadata["wan_task"], settings=settings)  # fmt: skip
    records.update(
        job.id,
        generation={
            "seed": seed,
            "width": width,
            "height": height,
            "frame_num": frame_num,
            "frames_path": str(path.resolve()),
            "host": settings.worker_host,  # whose spool: the media stages go there
            "prompt": job.prompt,  # what WAN received: the enhanced prompt, if any
            "peak_gpu_memory_mib": peak_mib,
            "metadata": job.reference_notes | generated.metadata | (batch or {}),
            "asset_metadata": produced.asset_metadata(),
            "provenance": provenance | (batch or {}),
        },
    )


@worker_process_init.connect
def warm_up(sender: str, **_: Any) -> None:
    """WARMUP=1: this pool child loads the pipelines and runs one small generation before it
    takes a job, so the first user job pays neither the load nor the compilation.

    Why in `worker_process_init`: Celery writes jobs to a pool child only after the child
    reports up, which it does when this signal's handlers have returned; so the warm-up runs
    before any job, and again in every replacement child (after a crash or
    max_tasks_per_child), in the process that keeps the model. The 4 s Celery allows here
    is raised for WARMUP at start (`tasks.app.check_speed_options`). A warm-up task sent on
    `worker_ready` could be taken by another GPU worker or wait behind queued jobs; a
    bootstep runs in the parent, which must not touch CUDA before the fork.
    """
    settings = get_settings()
    if not settings.warmup or "gpu" not in app.amqp.queues.consume_from:
        return
    from worker.generation import speed

    started = time.perf_counter()
    runs = speed.warm_up(generate.pipelines)
    generate.note_loaded(settings, sender)
    log.info("warm-up done in %.1f s: pipelines %s loaded, ran %s; taking jobs now",
             time.perf_counter() - started, ", ".join(generate.pipelines.loaded()),
             ", ".join(runs))  # fmt: skip
