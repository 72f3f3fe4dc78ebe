"""The `generate` stage, on the GPU queue: one pool child holds the WAN pipeline for good."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from media import spool
from tasks.app import app
from tasks.base import StageTask
from worker.callback import notify_processing
from worker.jobs import SEED_MAX
from worker.observe.loaded_models import LoadedModels
from worker.records import get_records
from worker.settings import get_settings

if TYPE_CHECKING:
    from diffusers import WanPipeline


class GenerateTask(StageTask):
    """Loads the pipeline on first use in the pool child, after the fork, and keeps it.

    Never at import (the API, the media worker and tests would pay) and never in
    `worker_process_init` (Celery gives it 4 s). Job N+1 reuses what job N loaded.
    """

    abstract = True
    _pipe: WanPipeline | None = None

    @property
    def pipe(self) -> WanPipeline:
        if self._pipe is None:
            from worker.generation import load_t2v  # torch comes in here, in the GPU child only

            settings = get_settings()
            type(self)._pipe = load_t2v(settings)
            LoadedModels(get_records().redis).note(
                self.request.hostname, "wan_t2v", path=str(settings.wan_model_path), loaded=True
            )
        return self._pipe


@app.task(base=GenerateTask, bind=True, name="wan.generate", stage="generate")
def generate(self: GenerateTask, job_id: str) -> None:
    from worker.generation import generate_frames

    settings = get_settings()
    records = get_records()
    record = records.get(job_id)
    job = record.job
    # A redelivered job keeps the seed chosen the first time, so its result is the same.
    seed = record.value("seed")
    if seed is None:
        seed = job.seed if job.seed is not None else secrets.randbelow(SEED_MAX + 1)
        records.update(job_id, seed=seed)
    records.write(job_id, status="processing")
    notify_processing(settings, job_id)

    def on_step(done: int, total: int) -> None:
        records.update(job_id, progress={"step": done, "steps": total})

    enhancement = record.value("enhancement") or {}
    job = job.model_copy(update={"prompt": enhancement.get("enhanced_prompt") or job.prompt})
    frames = generate_frames(self.pipe, job, seed=seed, on_step=on_step)
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
        },
    )
