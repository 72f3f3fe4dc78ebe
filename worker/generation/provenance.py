"""What reproduces a result: model, revision, pipeline, scheduler, the values used, the code.

Recorded with every generation and sent in the completed callback, so a user (or the
on-call engineer) can say exactly how an image or video came about.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

import worker
from worker.generation import speed
from worker.generation.load import Pipelines
from worker.generation.modes import denoise_steps
from worker.jobs.model import Job
from worker.model_files import model_revision
from worker.settings import Settings

#: `wan_task` of a result -> the pipeline that made it and the setting naming its weights.
PIPELINE_OF_TASK = {
    "t2v-1.3B": ("t2v", "wan_model_path"),
    "v2v-1.3B": ("v2v", "wan_model_path"),
    "vace-1.3B": ("vace", "wan_vace_model_path"),
}


def describe(
    pipelines: Pipelines, job: Job, *, seed: int, wan_task: str, settings: Settings
) -> dict[str, Any]:
    """Provenance of one generation (`job` is as WAN ran it: its prompt is the one used, its
    steps and guidance those of the turbo checkpoint when `turbo`). `step_cache` says what
    WAN_CACHE did on this job's pipeline (`speed.step_cache`)."""
    name, path_setting = PIPELINE_OF_TASK[wan_task]
    pipe: DiffusionPipeline = getattr(pipelines, name)
    path = getattr(settings, path_setting)
    scheduler = pipe.scheduler.config
    steps_run = denoise_steps(job) if name == "v2v" else job.steps
    return {
        "model": path.name,
        "model_revision": model_revision(path),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "shift": scheduler.get("flow_shift", scheduler.get("shift")),
        "steps": job.steps,
        "guidance": job.guidance,
        "seed": seed,
        "width": job.width,
        "height": job.height,
        "frames": job.frames,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "device": str(pipe.transformer.device),
        "speed_options": speed.in_force(settings, pipelines.device),
        "step_cache": speed.step_cache(settings, job, pipe.transformer, steps=steps_run),
        "turbo": job.turbo,
        **({"turbo_checkpoint": speed.turbo_checkpoint(settings).name} if job.turbo else {}),
        "worker_version": worker.__version__,
    }
