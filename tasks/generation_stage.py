"""The generate stage's task class and the steps every generation shares, one job's
(tasks/generate.py) or an image batch's (tasks/image_batch.py): a long video's time limits
(per window), marking the job `processing`, its progress callbacks, and its frames and
provenance into the record."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeLimitExceeded
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from media import references, spool
from tasks.base import NETWORK_RETRY, StageTask
from worker.errors import ReferenceUnusable, StageTimedOut, TransientError
from worker.flow.callback import notify_processing
from worker.jobs.model import Job
from worker.jobs.records import JobRecords, get_records
from worker.observe.loaded_models import LoadedModels
from worker.observe.progress import Notify
from worker.settings import Settings, get_settings, soft_limit_setting

if TYPE_CHECKING:
    from PIL import Image

    from worker.generation import Pipelines
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

    def apply_async(
        self, args: tuple | None = None, kwargs: dict | None = None, **options: Any
    ) -> Any:
        """A long video's generation runs under the stage's time limits once per window
        (GENERATE_SOFT_LIMIT_S x windows, then HARD_LIMIT_GRACE_S): whoever sends it (the
        chain after enhance, a retry, the lost-job sweep, a resume) reads its windows from
        the job record, as the media stages' router reads their host."""
        if args and (limits := window_limits(str(args[0]))) is not None:
            _, soft_s, hard_s = limits
            options |= {"soft_time_limit": soft_s, "time_limit": hard_s}
        return super().apply_async(args, kwargs, **options)

    def timed_out(self, job_id: str) -> StageTimedOut:
        limits = window_limits(job_id)
        if limits is None:
            return super().timed_out(job_id)
        count, soft_s, _ = limits
        return StageTimedOut(
            f"generate ran past its soft time limit of {soft_s:g} s "
            f"({soft_limit_setting('generate')}={soft_s / count:g} per window x {count} windows)"
        )

    def killed_at_hard_limit(self, job_id: str) -> StageTimedOut:
        limits = window_limits(job_id)
        if limits is None:
            return super().killed_at_hard_limit(job_id)
        count, soft_s, hard_s = limits
        return StageTimedOut(
            f"generate was killed at its hard time limit of {hard_s:g} s "
            f"({soft_limit_setting('generate')}={soft_s / count:g} per window x {count} windows "
            "+ HARD_LIMIT_GRACE_S): it did not stop at the soft limit"
        )

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


def window_limits(job_id: str) -> tuple[int, float, float] | None:
    """(windows, soft, hard) time limits of a long video's generation, seconds; None for a
    job made in one pass (the stage's own limits) or one with no valid job recorded."""
    from worker.generation.windows import window_count  # arithmetic: no torch comes in

    record = get_records().get(job_id)
    if "job" not in record.fields:
        return None
    settings = get_settings()
    count = window_count(record.job, settings)
    if count == 1:
        return None
    soft_s, _ = settings.stage_time_limits()["generate"]
    return count, soft_s * count, soft_s * count + settings.hard_limit_grace_s


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


def record_generation(
    task: GenerateTask,
    settings: Settings,
    records: JobRecords,
    produced: Produced,
    *,
    seed: int,
    peak_mib: float | None,
    batch: dict[str, Any] | None = None,
    notes: dict[str, Any] | None = None,
) -> None:
    """The frames into this host's spool (a long video's windows are there already), and
    what made them into the job's record (the media stages and the completed callback read
    it). `batch`: the batch it was made in; `notes`: more for the callback's metadata."""
    from worker.generation.modes import Generated
    from worker.generation.provenance import describe

    generated, job = produced.generated, produced.job
    records.confirm_run(job.id)  # a superseded run must not overwrite the new run's frames
    if isinstance(generated, Generated):
        frames = generated.frames
        path = spool.write_frames(spool.frames_path(settings.spool_dir, job.id), frames)
        frame_num, height, width, _ = frames.shape
    else:  # window by window (worker.generation.continuation): in the spool already
        path, frame_num = generated.frames_dir, generated.frame_num
        height, width = job.height, job.width
    provenance = describe(task.pipelines, job, seed=seed,
                          wan_task=generated.metadata["wan_task"], settings=settings)  # fmt: skip
    if "continuation" in generated.metadata:
        provenance["continuation"] = generated.metadata["continuation"]
    if job.segments:  # what WAN received, segment by segment
        provenance["segment_prompts"] = [segment.prompt for segment in job.segments]
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
            "metadata": job.reference_notes | job.length_notes | generated.metadata
            | (batch or {}) | (notes or {}),
            "asset_metadata": produced.asset_metadata(),
            "provenance": provenance | (batch or {}),
        },
    )  # fmt: skip
