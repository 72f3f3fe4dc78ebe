"""Running one job on the loaded pipeline: the per-mode calls."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import WanPipeline

from worker.errors import UnsupportedMode
from worker.jobs import Job

#: Called after each denoising step with (steps done, steps in all).
StepHook = Callable[[int, int], None]


def generate_frames(
    pipe: WanPipeline, job: Job, *, seed: int, on_step: StepHook | None = None
) -> np.ndarray:
    """Run one job; return its frames as uint8 (F, H, W, 3)."""
    if job.reference_mode != "none":
        raise UnsupportedMode(
            f"reference_mode {job.reference_mode!r} (reference frames, image to image) is not "
            "supported by this worker version yet: it needs the VACE and video-to-video pipelines"
        )
    _set_shift(pipe, job.shift)

    def step_end(pipeline: WanPipeline, step: int, timestep: int, kwargs: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        return kwargs

    output = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or None,
        height=job.height,
        width=job.width,
        num_frames=job.frames,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        # A CPU generator gives the same noise for a seed on every device.
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="np",
        callback_on_step_end=step_end,
    )
    frames = output.frames[0]
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _set_shift(pipe: WanPipeline, shift: float) -> None:
    """Flow shift lives in the scheduler config (`flow_shift` for UniPC, `shift` for Euler)."""
    config = pipe.scheduler.config
    name = "flow_shift" if "flow_shift" in config else "shift"
    if config.get(name) != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(config, **{name: shift})
