"""WARMUP=1: load every configured pipeline and run a small generation before the first job.

The top of the generation package: it loads (`load`), sets speed options up (`speed`) and
runs a mode (`modes`), so none of those needs to know about it.
"""

from __future__ import annotations

from typing import Any

from worker.generation.load import Pipelines
from worker.generation.modes import generate
from worker.generation.speed import as_run, turbo_checkpoint
from worker.jobs.model import Job, parse_job

#: The warm-up generation: an image at the platform's default size, in two steps (turbo: its
#: own steps), so compiled blocks meet the most common shape before the first job.
WARMUP_RESOLUTION, WARMUP_STEPS = "480x832", 2


def warm_up(pipelines: Pipelines) -> list[str]:
    """Load every configured pipeline and run one small generation on text to video (and one
    turbo one when a turbo checkpoint is set): kernels load, compiled blocks compile. The
    names of the generations run, for the log."""
    pipelines.t2v, pipelines.v2v  # noqa: B018 (the properties load)
    if pipelines.settings.wan_vace_model_path is not None:
        pipelines.vace  # noqa: B018
    runs: list[tuple[str, int | None]] = [("image_high", WARMUP_STEPS)]
    if turbo_checkpoint(pipelines.settings) is not None:
        runs.append(("image_fast", None))
    done = []
    for job_type, steps in runs:
        job = as_run(_warmup_job(job_type, steps), pipelines.settings)
        generate(pipelines, job, seed=0, references={})
        done.append(f"{job_type}{' (turbo)' if job.turbo else ''}")
    return done


def _warmup_job(job_type: str, steps: int | None) -> Job:
    config: dict[str, Any] = {"resolution": WARMUP_RESOLUTION, "seed": 0}
    if steps is not None:
        config["num_inference_steps"] = steps
    return parse_job({"id": "warm-up", "user_id": "worker", "type": job_type,
                      "prompt": "warm-up", "config": config})  # fmt: skip
