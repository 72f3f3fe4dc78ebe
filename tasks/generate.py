"""The `generate` stage, on the GPU queue: one pool child holds the WAN pipelines for good.

A job's references are downloaded here, before any GPU work and before `processing` is
sent: a transient failure (timeout, connection error, 429, 5xx) retries this task with
Celery's exponential backoff and jitter; a reference that is refused, undecodable or still
failing after `REFERENCE_RETRIES` retries makes the job text-only, and the callback says why.
"""

from __future__ import annotations

import secrets
import threading
from typing import TYPE_CHECKING

from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from media import references, spool
from tasks.app import app
from tasks.base import NETWORK_RETRY, StageTask
from worker.callback import notify_processing
from worker.errors import ReferenceUnusable, TransientError
from worker.job_control import raise_if_cancelled
from worker.jobs import SEED_MAX, Job
from worker.observe.loaded_models import LoadedModels
from worker.observe.metrics import Metrics
from worker.observe.progress import Notify, Progress
from worker.records import get_records
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from PIL import Image

    from worker.generation import Pipelines

log = get_task_logger(__name__)


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

    def note_loaded(self, settings: Settings) -> None:
        """Tell /health which pipelines this child holds now (written when that changes)."""
        paths = {"t2v": settings.wan_model_path, "vace": settings.wan_vace_model_path,
                 "v2v": settings.wan_model_path}  # fmt: skip
        registry = LoadedModels(get_records().redis)
        for name in self.pipelines.loaded():
            if name not in self._noted:
                registry.note(self.request.hostname, f"wan_{name}", path=str(paths[name]),
                              loaded=True)  # fmt: skip
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


def progress_callback(settings: Settings, job_id: str) -> Notify | None:
    """With PROGRESS_CALLBACKS, `processing` callbacks carrying the progress, sent from a
    thread of their own: the denoising loop never waits for the platform."""
    if not settings.progress_callbacks:
        return None

    def notify(progress: dict) -> None:
        threading.Thread(
            target=notify_processing, args=(settings, job_id, progress), daemon=True
        ).start()

    return notify


@app.task(base=GenerateTask, bind=True, name="wan.generate", stage="generate")
def generate(self: GenerateTask, job_id: str) -> None:
    from worker.generation import generate as run
    from worker.generation import gpu_memory
    from worker.generation.load import vace_model_dir
    from worker.generation.provenance import describe

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
    records.write(job_id, status="processing")
    notify_processing(settings, job_id)

    progress = Progress(
        records, job_id, task=self, notify=progress_callback(settings, job_id),
        notify_every_s=settings.progress_callback_every_s,
    )  # fmt: skip

    def on_step(done: int, total: int) -> None:
        progress.step("generate", done, total)
        raise_if_cancelled(records, job_id)  # raised out of the pipeline: no VAE decode

    enhancement = record.value("enhancement") or {}
    job = job.model_copy(update={"prompt": enhancement.get("enhanced_prompt") or job.prompt})
    generated = run(
        self.pipelines,
        job,
        seed=seed,
        references=images,
        fallback_reason=fallback_reason,
        on_step=on_step,
    )
    self.note_loaded(settings)
    peak_mib = gpu_memory.report(Metrics(records.redis), self.request.hostname)
    frames = generated.frames
    path = spool.write_frames(spool.frames_path(settings.spool_dir, job_id), frames)
    frame_num, height, width, _ = frames.shape
    records.update(
        job_id,
        generation={
            "seed": seed,
            "width": width,
            "height": height,
            "frame_num": frame_num,
            "frames_path": str(path.resolve()),
            "prompt": job.prompt,  # what WAN received: the enhanced prompt, if any
            "peak_gpu_memory_mib": peak_mib,
            "metadata": job.reference_notes | generated.metadata,
            "provenance": describe(
                self.pipelines, job, seed=seed, wan_task=generated.metadata["wan_task"],
                settings=settings,
            ),
        },
    )  # fmt: skip
